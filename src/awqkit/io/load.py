"""Load a quantized checkpoint (ours, AutoAWQ GEMM, or compressed-tensors pack-quantized) without
transformers' quantizer integrations (no gptqmodel / autoawq / compressed-tensors needed).

How: build the model skeleton with ``AutoModelForCausalLM.from_config`` with every *parameter* on the
meta device (buffers such as rotary ``inv_freq`` are computed for real, as they are not in the state
dict), swap each linear whose checkpoint has ``qweight`` / ``weight_packed`` for an empty
:class:`QuantLinear`, assign the checkpoint tensors (``load_state_dict(assign=True)``; missing and
unexpected keys are errors), then re-tie tied weights (a tied LM head is not stored).

Which folders load: the method is read by :mod:`awqkit.io.detect` (the same answer ``awqkit info`` and
``awqkit eval`` give); gptq, bitsandbytes, ... and float folders are refused with a named error. Before any
tensor is assigned, :mod:`awqkit.io.validate` checks the config's size fields, the safetensors files, and
every tensor's dtype, shape and finiteness. Expected failures are :class:`~awqkit.errors.AwqkitError`
(``docs/errors.md``, section "Loading").
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from awqkit import kernels
from awqkit.errors import AwqkitError, CheckpointError, InputError
from awqkit.io import validate
from awqkit.io.ct_config import read_ct_config, scheme_for
from awqkit.io.detect import inspect_folder, load_refusal, read_config_json
from awqkit.io.skeleton import empty_model
from awqkit.kernels import cpu_avx2, cpu_int4
from awqkit.nn import hf
from awqkit.nn.fp16_storage import store_head_fp16
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import get_module
from awqkit.quant.packing import pack_ct, unpack_ct

logger = logging.getLogger(__name__)

_BENIGN_EXTRA = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_MAX_LISTED = 20


def read_quant_config(path: str | Path) -> dict[str, Any]:
    """Normalized quantization settings of a checkpoint folder.

    The storage config and its method come from :func:`awqkit.io.detect.inspect_folder` (the same place
    ``awqkit info`` and ``awqkit eval`` read them): ``config.json["quantization_config"]`` (or its
    ``text_config``'s), else ``quantization_config.json`` / AutoAWQ's ``quant_config.json`` / AutoGPTQ's
    ``quantize_config.json``. Returns ``{"quant_method": "awq" | "compressed-tensors", "format": "gemm" |
    "pack-quantized", "bits", "group_size" (-1 = per row), "zero_point", "modules_to_not_convert": list,
    "raw": the original dict}``; a compressed-tensors config adds ``"groups"``, every config group's targets and
    settings (mixed bit widths; ``bits`` / ``group_size`` / ``zero_point`` are then the first group's, and
    :func:`awqkit.io.ct_config.scheme_for` gives each linear its own). Accepts AutoAWQ's ``w_bit`` /
    ``q_group_size`` keys and ``modules_to_not_convert: null``.

    Raises:
        CheckpointError: no storage config, a method awqkit does not load (gptq, bitsandbytes, ...), or
            settings it does not support (the message names them).
    """

    path = Path(path)
    info, found = inspect_folder(path)
    refusal = load_refusal(info, path)
    if refusal is not None or found is None:
        raise CheckpointError(refusal or f"{path} has no quantization config")
    raw = found.raw
    if found.method == "compressed-tensors":
        return read_ct_config(path, raw)
    version = str(raw.get("version", raw.get("format", "gemm"))).lower()
    bits = validate.int_setting(path, raw, ("bits", "w_bit"), 4)
    if version != "gemm" or bits != 4:
        raise CheckpointError(
            f"{path}: quantization_config AWQ version={version!r}, bits={bits} is not "
            "supported; awqkit loads 4-bit 'gemm' checkpoints"
        )
    group_size = validate.int_setting(path, raw, ("group_size", "q_group_size"), 128)
    validate.check_bits_group(path, bits, group_size)
    zero_point = raw.get("zero_point", True)
    if not isinstance(zero_point, bool):
        raise CheckpointError(f"{path}: quantization_config zero_point={zero_point!r} must be true or false")
    return {
        "quant_method": "awq",
        "format": "gemm",
        "bits": 4,
        "group_size": group_size,
        "zero_point": zero_point,
        "modules_to_not_convert": validate.name_list(path, raw, "modules_to_not_convert"),
        "raw": raw,
    }


def _strip_quant_config(config: Any) -> None:
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(sorted(keys)[:_MAX_LISTED]) + more


def _install_quant_linears(model: nn.Module, sd: dict[str, Tensor], qc: dict[str, Any], path: Path) -> list[str]:
    """Swap every linear with packed tensors in ``sd`` for an empty (meta) QuantLinear; returns names."""
    gemm = qc["format"] == "gemm"
    marker, other = (".qweight", ".weight_packed") if gemm else (".weight_packed", ".qweight")
    if any(k.endswith(other) for k in sd):
        raise CheckpointError(
            f"checkpoint {path} mixes layouts: found '*{other}' tensors in a {qc['format']!r} "
            "checkpoint; re-save it with one quantization format"
        )
    names = [k[: -len(marker)] for k in sd if k.endswith(marker)]
    if not names:
        raise CheckpointError(
            f"checkpoint {path} has no '*{marker}' tensors although quantization_config says it "
            f"is {qc['quant_method']!r}; restore the config.json the checkpoint was saved with"
        )
    for name in names:
        try:
            linear = get_module(model, name)
        except ValueError:
            raise CheckpointError(
                f"checkpoint {path} does not match the {type(model).__name__} built from its config: it has "
                f"packed weights for {name!r}, which that model lacks (does config.json belong to these weights?)"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(
                f"checkpoint {path} has packed weights for {name!r}, but the model's module "
                f"there is a {type(linear).__name__}, not an nn.Linear"
            )
        scheme = scheme_for(qc, name, linear)
        if scheme is None:
            raise CheckpointError(
                f"{path}: quantization_config is not supported: no config group targets {name} (or its ignore list "
                "names it), which has packed weights; restore the config.json the checkpoint was saved with"
            )
        zero_point = scheme.zero_point if gemm else f"{name}.weight_zero_point" in sd
        try:
            with torch.device("meta"):
                qlinear = QuantLinear(
                    linear.in_features,
                    linear.out_features,
                    scheme.bits,
                    scheme.group_size,
                    bias=f"{name}.bias" in sd,
                    zero_point=zero_point,
                    format=qc["format"],
                )
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {path}: quantization_config (bits={scheme.bits}, group_size={scheme.group_size}) does "
                f"not fit the {linear.in_features}->{linear.out_features} linear {name} ({exc}); restore the "
                "config.json the checkpoint was saved with"
            ) from None
        parent_name, _, leaf = name.rpartition(".")
        setattr(get_module(model, parent_name), leaf, qlinear)
    return names


def _repack_legacy_ct(sd: dict[str, Tensor], name: str, qlinear: QuantLinear) -> None:
    """Convert older padded compressed-tensors words (3/5/6/7 bits) to the dense layout in place (the
    tensors were validated: int32, dense or padded widths)."""
    wp = sd.get(f"{name}.weight_packed")
    zp = sd.get(f"{name}.weight_zero_point")
    dense = wp is None or wp.shape == qlinear.weight_packed.shape
    if zp is not None:
        dense = dense and zp.shape == qlinear.weight_zero_point.shape
    if dense or wp is None or f"{name}.weight_scale" not in sd:
        return
    shape = (qlinear.out_features, qlinear.in_features)
    q, zeros, scales = unpack_ct(wp, sd[f"{name}.weight_scale"], shape, qlinear.bits, zp)
    repacked = pack_ct(q, zeros, scales, qlinear.bits, include_zero_point=zp is not None)
    sd[f"{name}.weight_packed"] = repacked["weight_packed"]
    if zp is not None:
        sd[f"{name}.weight_zero_point"] = repacked["weight_zero_point"]


def _resolve_dtype(config: Any, device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if device.type == "cpu":
        return torch.float32
    cfg_dtype = getattr(config, "dtype", None) or torch.float16
    cfg_dtype = getattr(torch, cfg_dtype, None) if isinstance(cfg_dtype, str) else cfg_dtype
    if not isinstance(cfg_dtype, torch.dtype) or not cfg_dtype.is_floating_point:
        logger.warning("config.json names dtype %r, not a float dtype; using float16", getattr(config, "dtype", None))
        return torch.float16
    return cfg_dtype


def _build_model(
    path: Path, raw_cfg: dict[str, Any], device: torch.device, dtype: torch.dtype | None, trust_remote_code: bool
) -> tuple[Any, nn.Module, torch.dtype]:
    """``(config, model with parameters on meta, dtype)`` from ``config.json``; a config transformers cannot
    build a causal LM from is a CheckpointError (its own exception, whatever its type, is quoted)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        _strip_quant_config(config)
        validate.check_config_fields(path, raw_cfg, config)
        dtype = _resolve_dtype(config, device, dtype)
        model = empty_model(config, dtype, trust_remote_code=trust_remote_code)
    except AwqkitError:
        raise
    except Exception as exc:  # noqa: BLE001 -- transformers raises many types for a bad config; all mean that
        raise CheckpointError(
            f"building the model from {path / 'config.json'} failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); restore the config.json the checkpoint was "
            "saved with"
        ) from None
    return config, model, dtype


def _assign_state(model: nn.Module, config: Any, sd: dict[str, Tensor], path: Path, qc: dict[str, Any]) -> None:
    """Load ``sd`` into ``model`` (assigning its tensors), re-tie the parameters the checkpoint stores once
    (aliases and a tied embedding), and refuse a state that leaves keys missing, unexpected or on meta."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches (validate.check_tensors catches them first)
        raise CheckpointError(
            f"checkpoint {path}: tensor shapes do not match the {type(model).__name__} built from its config "
            f"(is group_size={qc['group_size']} in quantization_config right?): {' '.join(str(exc).split())}"
        ) from None
    retie: dict[str, str] = {}
    for names in aliases.values():
        loaded = [n for n in names if n in sd]
        if loaded:
            retie.update({n: loaded[0] for n in names if n in missing})
    retie.update(_tied_embedding(model, config, sd, missing))
    missing = [k for k in missing if k not in retie]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the {type(model).__name__} built from its config: "
            f"missing keys [{_listing(missing)}]; unexpected keys [{_listing(unexpected)}]. "
            "Was it written for another architecture or transformers version?"
        )
    for target, source in retie.items():
        parent_name, _, leaf = target.rpartition(".")
        setattr(get_module(model, parent_name), leaf, model.get_parameter(source))
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(
            f"checkpoint {path} does not match the {type(model).__name__} built from its config: "
            f"tensors left uninitialized after loading: {_listing(still_meta)}"
        )


def load_quantized(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    trust_remote_code: bool = False,
    fp16_head: bool | None = None,
) -> nn.Module:
    """Load a quantized causal LM from ``path`` onto ``device``.

    Args:
        path: checkpoint folder (config.json + safetensors).
        device: where the model ends up.
        dtype: dtype of the non-quantized weights; default float32 on CPU (no fast fp16 there), else the
            config's dtype (fp16 if unset). Packed buffers keep their stored dtypes (int32, fp16 scales).
        backend: kernel backend for every QuantLinear (``"auto"``, ``"torch"``, ...).
        trust_remote_code: passed to transformers for models with custom code.
        fp16_head: keep the LM head (and its tied embedding) in fp16 storage, computed in fp32
            (:func:`awqkit.nn.fp16_storage.store_head_fp16`; only when its weights are exactly fp16, so
            outputs do not change). None: on for CPU + float32 + backend ``auto``/``cpu-avx2`` when the
            ``cpu-avx2`` kernels are available (it halves the head's read per decoded token).
    Returns:
        the model in eval mode, with ``model.awqkit_quant_config`` = :func:`read_quant_config`'s dict.
    """

    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} has no config.json; pass a checkpoint folder written by save_quantized or AutoAWQ"
        )
    raw_cfg = read_config_json(path) or {}
    qc = read_quant_config(path)
    if backend != "auto":
        try:
            kernels.get_backend(backend)  # fail early on unknown / unavailable backends
        except (ValueError, RuntimeError) as exc:
            raise InputError(str(exc)) from None
    device = torch.device(device)
    validate.check_config_fields(path, raw_cfg)
    sd, where = validate.read_tensors(path)
    validate.check_config_against_tensors(path, raw_cfg, sd)
    config, model, dtype = _build_model(path, raw_cfg, device, dtype, trust_remote_code)

    for key in [k for k in sd if _BENIGN_EXTRA.search(k)]:
        del sd[key]
    qnames = set(_install_quant_linears(model, sd, qc, path))
    validate.check_tensors(model, sd, where, path, qc)
    for name in qnames:
        if qc["format"] != "gemm":
            _repack_legacy_ct(sd, name, get_module(model, name))  # type: ignore[arg-type]
    for key, t in sd.items():
        if t.is_floating_point() and key.rpartition(".")[0] not in qnames:
            sd[key] = t.to(dtype)

    _assign_state(model, config, sd, path, qc)
    model.to(device)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.backend = backend
    try:
        _prepare_cpu(model, device, dtype, backend, fp16_head)
    except AwqkitError:
        raise
    except ValueError as exc:  # a named backend that cannot run these layers (e.g. cpu-avx2, non-fp16 scales)
        raise InputError(f"{path}: {' '.join(str(exc).split())}") from None
    model.eval()
    model.awqkit_quant_config = qc  # type: ignore[assignment]  # a plain attribute (Module.__setattr__'s type)
    widths = sorted({m.bits for m in model.modules() if isinstance(m, QuantLinear)})
    logger.info(
        "loaded %s: %d quantized linears (%s, %s-bit, g=%d) on %s",
        path,
        len(qnames),
        qc["format"],
        "/".join(map(str, widths)),
        qc["group_size"],
        device,
    )
    return model


def _prepare_cpu(
    model: nn.Module, device: torch.device, dtype: torch.dtype, backend: str, fp16_head: bool | None
) -> None:
    """Convert the quantized layers for the CPU backend ``backend`` resolves to, once, now (unsupported
    layers are logged under ``auto`` and refused under a named backend), and apply ``fp16_head``."""

    on_cpu = device.type == "cpu"
    avx2 = on_cpu and backend in ("auto", cpu_avx2.NAME) and cpu_avx2.is_available()
    if avx2:
        cpu_avx2.prepare_model(model, backend=backend)
    elif on_cpu and backend in ("auto", cpu_int4.NAME) and cpu_int4.is_available():
        cpu_int4.prepare_model(model, backend=backend)
    if fp16_head is None:
        fp16_head = avx2 and dtype == torch.float32
    if fp16_head:
        store_head_fp16(model)


def _tied_embedding(model: nn.Module, config: Any, sd: dict[str, Tensor], missing: list[str]) -> dict[str, str]:
    """``{output embedding key: input embedding key}`` when the config ties them and only the input is stored."""
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = hf.output_embeddings(model), hf.input_embeddings(model)
    if out_emb is None or in_emb is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out_key, in_key = f"{names[id(out_emb)]}.weight", f"{names[id(in_emb)]}.weight"
    if out_key in missing and in_key in sd:
        return {out_key: in_key}
    return {}


__all__ = ["load_quantized", "read_quant_config"]
