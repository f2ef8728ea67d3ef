"""Load a quantized checkpoint (ours, AutoAWQ GEMM, or compressed-tensors pack-quantized) without
transformers' quantizer integrations (no gptqmodel / autoawq / compressed-tensors needed).

How: build the model skeleton with ``AutoModelForCausalLM.from_config`` with every *parameter* on the
meta device (buffers such as rotary ``inv_freq`` are computed for real, as they are not in the state
dict), swap each linear whose checkpoint has ``qweight`` / ``weight_packed`` for an empty
:class:`QuantLinear`, assign the checkpoint tensors (``load_state_dict(assign=True)``; missing and
unexpected keys are errors), then re-tie tied weights (a tied LM head is not stored).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from awqkit import kernels
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import get_module
from awqkit.quant.packing import pack_ct, unpack_ct

logger = logging.getLogger(__name__)

_BENIGN_EXTRA = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_MAX_LISTED = 20


def read_quant_config(path: str | Path) -> dict[str, Any]:
    """Normalized quantization settings of a checkpoint folder.

    Reads ``config.json["quantization_config"]`` (or AutoAWQ's ``quant_config.json`` /
    ``quantize_config.json``) and returns ``{"quant_method": "awq" | "compressed-tensors", "format":
    "gemm" | "pack-quantized", "bits", "group_size" (-1 = per row), "zero_point",
    "modules_to_not_convert": list, "raw": the original dict}``. Accepts AutoAWQ's ``w_bit`` /
    ``q_group_size`` keys and ``modules_to_not_convert: null``.
    """
    path = Path(path)
    raw = None
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        raw = json.loads(cfg_file.read_text()).get("quantization_config")
    side_file = None
    for alt in ("quant_config.json", "quantize_config.json"):
        if raw is None and (path / alt).is_file():
            raw, side_file = json.loads((path / alt).read_text()), alt
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path} has no quantization_config in config.json (nor quant_config.json); "
            "it is not a quantized checkpoint, load it with transformers directly"
        )
    method = raw.get("quant_method")
    if method is None and side_file is not None:
        from awqkit.eval.detect import side_config_method  # AutoGPTQ's side file must not be read as AWQ

        method = side_config_method(raw)
    method = str(method or "awq").lower()
    if method == "awq":
        version = str(raw.get("version", raw.get("format", "gemm"))).lower()
        bits = int(raw.get("bits", raw.get("w_bit", 4)))
        if version != "gemm" or bits != 4:
            raise ValueError(
                f"{path}: AWQ version={version!r}, bits={bits} is not supported; awqkit loads 4-bit 'gemm' checkpoints"
            )
        return {
            "quant_method": "awq",
            "format": "gemm",
            "bits": 4,
            "group_size": int(raw.get("group_size", raw.get("q_group_size", 128))),
            "zero_point": bool(raw.get("zero_point", True)),
            "modules_to_not_convert": list(raw.get("modules_to_not_convert") or []),
            "raw": raw,
        }
    if method == "compressed-tensors":
        return _read_ct(path, raw)
    raise ValueError(f"{path}: quant_method={method!r} is not supported; awqkit loads 'awq' and 'compressed-tensors'")


def _read_ct(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    groups = raw.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{path}: expected exactly one compressed-tensors config group, found {len(groups)}")
    group = next(iter(groups.values()))
    fmt = group.get("format") or raw.get("format")
    if fmt != "pack-quantized" or raw.get("quantization_status", "compressed") != "compressed":
        raise ValueError(
            f"{path}: compressed-tensors format={fmt!r}, status={raw.get('quantization_status')!r} is not "
            "supported; awqkit loads compressed 'pack-quantized' weight-only checkpoints"
        )
    w = group.get("weights") or {}
    if group.get("input_activations") or w.get("type", "int") != "int" or w.get("actorder") == "group":
        raise ValueError(f"{path}: only weight-only int quantization without group act-order is supported")
    strategy = w.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise ValueError(f"{path}: weight strategy {strategy!r} is not supported (use 'group' or 'channel')")
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "bits": int(w["num_bits"]),
        "group_size": -1 if strategy == "channel" else int(w["group_size"]),
        "zero_point": not bool(w.get("symmetric", True)),
        "modules_to_not_convert": list(raw.get("ignore") or []),
        "raw": raw,
    }


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """While active, every registered ``nn.Parameter`` moves to the meta device (buffers stay real).
    Patches ``nn.Module.register_parameter`` process-wide: do not construct models concurrently."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _no_init() -> contextlib.AbstractContextManager:
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _read_tensors(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, Tensor] = {}
    for fname in files:
        if not (path / fname).is_file():
            raise ValueError(f"{path}: shard {fname} listed in the index is missing")
        tensors.update(load_file(str(path / fname), device="cpu"))
    return tensors


def _strip_quant_config(config: Any) -> None:
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(sorted(keys)[:_MAX_LISTED]) + more


def _install_quant_linears(
    model: nn.Module, sd: dict[str, Tensor], qc: dict[str, Any]
) -> list[str]:
    """Swap every linear with packed tensors in ``sd`` for an empty (meta) QuantLinear; returns names."""
    gemm = qc["format"] == "gemm"
    marker, other = (".qweight", ".weight_packed") if gemm else (".weight_packed", ".qweight")
    if any(k.endswith(other) for k in sd):
        raise ValueError(f"checkpoint mixes layouts: found '*{other}' tensors in a {qc['format']!r} checkpoint")
    names = [k[: -len(marker)] for k in sd if k.endswith(marker)]
    if not names:
        raise ValueError(f"checkpoint has no '*{marker}' tensors although quantization_config says it is quantized")
    for name in names:
        linear = get_module(model, name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"checkpoint has packed weights for {name!r}, but the model's module there is "
                             f"a {type(linear).__name__}, not an nn.Linear")
        zero_point = qc["zero_point"] if gemm else f"{name}.weight_zero_point" in sd
        with torch.device("meta"):
            qlinear = QuantLinear(
                linear.in_features, linear.out_features, qc["bits"], qc["group_size"],
                bias=f"{name}.bias" in sd, zero_point=zero_point, format=qc["format"],
            )
        if not gemm:
            _repack_legacy_ct(sd, name, qlinear)
        parent_name, _, leaf = name.rpartition(".")
        setattr(get_module(model, parent_name), leaf, qlinear)
    return names


def _repack_legacy_ct(sd: dict[str, Tensor], name: str, qlinear: QuantLinear) -> None:
    """Convert older padded compressed-tensors words (3/5/6/7 bits) to the dense layout in place."""
    wp = sd.get(f"{name}.weight_packed")
    if wp is None or wp.shape == qlinear.weight_packed.shape or f"{name}.weight_scale" not in sd:
        return
    zp = sd.get(f"{name}.weight_zero_point")
    shape = (qlinear.out_features, qlinear.in_features)
    q, zeros, scales = unpack_ct(wp, sd[f"{name}.weight_scale"], shape, qlinear.bits, zp)
    repacked = pack_ct(q, zeros, scales, qlinear.bits, include_zero_point=zp is not None)
    sd[f"{name}.weight_packed"] = repacked["weight_packed"]
    if zp is not None:
        sd[f"{name}.weight_zero_point"] = repacked["weight_zero_point"]


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
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; pass a checkpoint folder written by save_quantized or AutoAWQ")
    qc = read_quant_config(path)
    if backend != "auto":
        kernels.get_backend(backend)  # fail early on unknown / unavailable backends
    device = torch.device(device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    _strip_quant_config(config)
    if dtype is None:
        cfg_dtype = getattr(config, "dtype", None) or torch.float16
        cfg_dtype = getattr(torch, cfg_dtype) if isinstance(cfg_dtype, str) else cfg_dtype
        dtype = torch.float32 if device.type == "cpu" else cfg_dtype
    with _params_on_meta(), _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)

    sd = _read_tensors(path)
    for key in [k for k in sd if _BENIGN_EXTRA.search(k)]:
        del sd[key]
    qnames = set(_install_quant_linears(model, sd, qc))
    for key, t in sd.items():
        if t.is_floating_point() and key.rpartition(".")[0] not in qnames:
            sd[key] = t.to(dtype)

    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(
            f"checkpoint {path}: tensor shapes do not match the {type(model).__name__} built from its config "
            f"(is group_size={qc['group_size']} in quantization_config right?): {exc}"
        ) from None
    retie: dict[str, str] = {}
    for names in aliases.values():
        loaded = [n for n in names if n in sd]
        if loaded:
            retie.update({n: loaded[0] for n in names if n in missing})
    retie.update(_tied_embedding(model, config, sd, missing))
    missing = [k for k in missing if k not in retie]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the {type(model).__name__} built from its config: "
            f"missing keys [{_listing(missing)}]; unexpected keys [{_listing(unexpected)}]. "
            "Was it written for another architecture or transformers version?"
        )
    for target, source in retie.items():
        parent_name, _, leaf = target.rpartition(".")
        setattr(get_module(model, parent_name), leaf, model.get_parameter(source))
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"tensors left uninitialized after loading {path}: {_listing(still_meta)}")

    model.to(device)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.backend = backend
    _prepare_cpu(model, device, dtype, backend, fp16_head)
    model.eval()
    model.awqkit_quant_config = qc
    logger.info("loaded %s: %d quantized linears (%s, %d-bit, g=%d) on %s",
                path, len(qnames), qc["format"], qc["bits"], qc["group_size"], device)
    return model


def _prepare_cpu(model: nn.Module, device: torch.device, dtype: torch.dtype, backend: str,
                 fp16_head: bool | None) -> None:
    """Convert the quantized layers for the CPU backend ``backend`` resolves to, once, now (unsupported
    layers are logged under ``auto`` and refused under a named backend), and apply ``fp16_head``."""
    from awqkit.kernels import cpu_avx2, cpu_int4

    on_cpu = device.type == "cpu"
    avx2 = on_cpu and backend in ("auto", cpu_avx2.NAME) and cpu_avx2.is_available()
    if avx2:
        cpu_avx2.prepare_model(model, backend=backend)
    elif on_cpu and backend in ("auto", cpu_int4.NAME) and cpu_int4.is_available():
        cpu_int4.prepare_model(model, backend=backend)
    if fp16_head is None:
        fp16_head = avx2 and dtype == torch.float32
    if fp16_head:
        from awqkit.nn.fp16_storage import store_head_fp16

        store_head_fp16(model)


def _tied_embedding(model: nn.Module, config: Any, sd: dict[str, Tensor], missing: list[str]) -> dict[str, str]:
    """``{output embedding key: input embedding key}`` when the config ties them and only the input is stored."""
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out_key, in_key = f"{names[id(out_emb)]}.weight", f"{names[id(in_emb)]}.weight"
    if out_key in missing and in_key in sd:
        return {out_key: in_key}
    return {}


__all__ = ["load_quantized", "read_quant_config"]
