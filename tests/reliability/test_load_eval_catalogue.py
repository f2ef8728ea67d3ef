"""Every catalogued failure of loading a folder (``load_quantized``, ``awqkit eval``/``generate``/``info``) and of
``awqkit eval``: the named error, its docs/errors.md message, one line on the command line, inputs unchanged.
Also: detection, ``awqkit info`` and the loaders agree on the method of every kind of folder."""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_harness import one_line_error, run, tree_hash
from conftest import TINY_CORPUS, make_tiny_tokenizer, save_tiny_llama
from errors_catalogue import assert_error
from safetensors.torch import load_file, save_file

from awqkit.errors import AwqkitError, CheckpointError, InputError, NonFiniteError
from awqkit.io.detect import LOADABLE_FORMATS, detect_quantization_method
from awqkit.io.load import load_quantized

GPTQ_QC = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
AUTOGPTQ_SIDE = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.01}


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float tiny Llama (src), its RTN w4 g32 AutoAWQ-GEMM quantization (rtn) and a 3-bit compressed-tensors
    one (ct), and a text file for ppl."""
    from awqkit.api import quantize
    from awqkit.config import QuantConfig

    root = tmp_path_factory.mktemp("load_eval")
    save_tiny_llama(root / "src")
    quantize(root / "src", root / "rtn", method="rtn", quant=QuantConfig(bits=4, group_size=32), progress=False)
    quantize(root / "src", root / "ct", method="rtn", quant=QuantConfig(bits=3, group_size=32), progress=False)
    (root / "text.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    return root


def _copy(golden: Path, name: str, dst: Path) -> Path:
    shutil.copytree(golden / name, dst)
    return dst


def _edit_json(file: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(file.read_text()) if file.exists() else {}
    fn(data)
    file.write_text(json.dumps(data))


def _edit_tensors(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )


def _refused(error_id: str, folder: Path, exc_type: type[AwqkitError] = CheckpointError, **kw: Any) -> str:
    """``load_quantized(folder)`` raises ``exc_type`` with catalogue entry ``error_id``'s message."""
    with pytest.raises(exc_type) as info:
        load_quantized(folder, **kw)
    assert_error(error_id, str(info.value))
    assert "\n" not in str(info.value)
    return str(info.value)


def _cli_refused(error_id: str, command: str, *argv: Any, sealed: Path | None = None) -> str:
    before = tree_hash(sealed) if sealed is not None else None
    result = run(command, *argv)
    assert result.rc == 2, (result.rc, result.err)
    line = one_line_error(result, command)
    assert_error(error_id, line)
    if sealed is not None:
        assert tree_hash(sealed) == before
    return line


# --------------------------------------------------------------------------- detection / info / load agree
def _variants(golden: Path, root: Path) -> dict[str, Path]:
    """Every kind of folder: awqkit outputs (gemm, rtn metadata, compressed-tensors), AutoAWQ without metadata,
    GPTQ (config, AutoGPTQ side file, with a ``version`` key, name only, side file beside stale awqkit metadata),
    a quantization config naming no method, bitsandbytes, float."""
    v = {"rtn": _copy(golden, "rtn", root / "rtn"), "ct": _copy(golden, "ct", root / "ct")}
    v["awq"] = _copy(golden, "rtn", root / "autoawq")
    (v["awq"] / "quantization_metadata.json").unlink()
    v["gptq-config"] = _copy(golden, "src", root / "gptq-config")
    _edit_json(v["gptq-config"] / "config.json", lambda c: c.update(quantization_config=GPTQ_QC))
    v["gptq-side"] = _copy(golden, "src", root / "gptq-side")
    (v["gptq-side"] / "quantize_config.json").write_text(json.dumps(AUTOGPTQ_SIDE))
    v["gptq-name"] = _copy(golden, "src", root / "Llama-tiny_GPTQ_w4_g128")
    v["gptq-stale-meta"] = _copy(golden, "src", root / "gptq-stale-meta")
    shutil.copy(golden / "rtn" / "quantization_metadata.json", v["gptq-stale-meta"])
    (v["gptq-stale-meta"] / "quantize_config.json").write_text(json.dumps(AUTOGPTQ_SIDE))
    v["gptq-side-version"] = _copy(golden, "src", root / "gptq-side-version")
    (v["gptq-side-version"] / "quantize_config.json").write_text(json.dumps({**AUTOGPTQ_SIDE, "version": 1}))
    v["no-method"] = _copy(golden, "src", root / "no-method")
    _edit_json(v["no-method"] / "config.json", lambda c: c.update(quantization_config={"bits": 4, "group_size": 128}))
    v["bnb"] = _copy(golden, "src", root / "bnb")
    _edit_json(
        v["bnb"] / "config.json",
        lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
    )
    v["fp"] = _copy(golden, "src", root / "fp")
    return v


EXPECTED = {  # folder -> (method, storage format)
    "rtn": ("rtn", "awq"),
    "ct": ("rtn", "compressed-tensors"),
    "awq": ("awq", "awq"),
    "gptq-config": ("gptq", "gptq"),
    "gptq-side": ("gptq", "gptq"),
    "gptq-name": ("gptq", None),
    "gptq-stale-meta": ("gptq", "gptq"),
    "gptq-side-version": ("gptq", "gptq"),
    "no-method": ("unknown", "unknown"),
    "bnb": ("bitsandbytes", "bitsandbytes"),
    "fp": ("fp", None),
}


def test_detect_info_and_loaders_agree_on_every_folder(golden: Path, tmp_path: Path) -> None:
    from awqkit.eval.runner_load import load_for_eval
    from awqkit.platform.info import describe_folder

    for name, folder in _variants(golden, tmp_path).items():
        det = detect_quantization_method(folder)
        assert (det.method, det.format) == EXPECTED[name], name
        info = describe_folder(folder)
        assert info.detected == det.to_dict(), name
        if info.spec is not None:  # the spec never names another method than the detection
            assert info.spec.method.value == ("none" if det.method == "fp" else det.method), name
        text = run("info", folder).out
        assert f"method:       {det.method}" in text, (name, text)
        if det.format in LOADABLE_FORMATS:
            model = load_quantized(folder, backend="torch")
            assert model.awqkit_quant_config["quant_method"] == det.format, name
            assert "loading:      load_quantized reads it" in text
            assert load_for_eval(folder, backend="torch").quantized
        elif det.format is not None:  # refused by the loader and by eval, naming the same method
            msg = _refused("LOAD-METHOD-UNSUPPORTED", folder)
            assert f"quant_method={det.format!r}" in msg and det.source in msg, name
            with pytest.raises(CheckpointError, match=f"quant_method={det.format!r}"):
                load_for_eval(folder)
            assert "refused by load_quantized" in text
        else:  # not quantized by its files: load_quantized refuses, eval loads it as a float model
            msg = _refused("LOAD-NOT-QUANTIZED", folder)
            assert det.method == "fp" or f"suggests {det.method!r}" in msg, name
            assert not load_for_eval(folder).quantized
            assert "not a quantized checkpoint" in text


# --------------------------------------------------------------------------- loading
def test_load_folder_and_config_errors(golden: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused("LOAD-NO-CONFIG", empty)
    _refused("LOAD-NO-CONFIG", tmp_path / "missing")
    _cli_refused("LOAD-NO-CONFIG", "generate", empty, "--prompt", "hi", sealed=empty)

    bad = _copy(golden, "rtn", tmp_path / "bad-json")
    (bad / "config.json").write_text("{not json")
    _refused("LOAD-CONFIG-JSON", bad)
    _cli_refused("LOAD-CONFIG-JSON", "info", bad, sealed=bad)
    (bad / "config.json").write_text("[1, 2]")
    _refused("LOAD-CONFIG-JSON", bad)

    q = _copy(golden, "rtn", tmp_path / "q")
    cfg = json.loads((q / "config.json").read_text())

    def with_config(**changes: Any) -> Path:
        """``q`` with its original config.json, ``changes`` applied (None drops the key)."""
        edited = {**cfg, **changes}
        (q / "config.json").write_text(json.dumps({k: v for k, v in edited.items() if v is not None}))
        return q

    for changes in (
        {"hidden_size": None},
        {"num_hidden_layers": "2"},
        {"num_hidden_layers": 3},
        {"vocab_size": 999},
        {"model_type": None},
    ):
        msg = _refused("LOAD-CONFIG-FIELD", with_config(**changes))
        assert next(iter(changes)) in msg
    _refused("LOAD-CONFIG-INVALID", with_config(model_type="no_such_model"))
    _cli_refused("LOAD-CONFIG-INVALID", "generate", q, "--prompt", "hi", sealed=q)


def test_quantization_config_errors(golden: Path, tmp_path: Path) -> None:
    q = _copy(golden, "rtn", tmp_path / "q")
    qc = json.loads((q / "config.json").read_text())["quantization_config"]
    for change in (
        {"group_size": "32"},
        {"version": "gemv"},
        {"bits": 3},
        {"zero_point": "yes"},
        {"group_size": 0},
        {"group_size": 48},
        {"modules_to_not_convert": "lm_head"},
    ):
        _edit_json(q / "config.json", lambda c, change=change: c.update(quantization_config={**qc, **change}))
        _refused("LOAD-QUANT-CONFIG", q)
    _edit_json(q / "config.json", lambda c: c.update(quantization_config="awq"))
    _refused("LOAD-QUANT-CONFIG", q)
    ct = _copy(golden, "ct", tmp_path / "ct")
    _edit_json(
        ct / "config.json", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=9)
    )
    _refused("LOAD-QUANT-CONFIG", ct)
    gptq = _copy(golden, "src", tmp_path / "gptq")
    (gptq / "quantize_config.json").write_text(json.dumps(AUTOGPTQ_SIDE))
    _cli_refused("LOAD-METHOD-UNSUPPORTED", "generate", gptq, "--prompt", "hi", sealed=gptq)
    _cli_refused("LOAD-NOT-QUANTIZED", "generate", golden / "src", "--prompt", "hi")


def _header(folder: Path) -> tuple[int, bytes]:
    blob = (folder / "model.safetensors").read_bytes()
    return struct.unpack("<Q", blob[:8])[0], blob


@pytest.mark.parametrize("damage", ["cut_data", "cut_header", "garbage_header", "length_beyond_file", "empty"])
def test_truncated_or_corrupt_safetensors(golden: Path, tmp_path: Path, damage: str) -> None:
    q = _copy(golden, "rtn", tmp_path / "q")
    n, blob = _header(q)
    out = {
        "cut_data": blob[:-100],
        "cut_header": blob[: 8 + n // 2],
        "empty": b"",
        "garbage_header": blob[:8] + b"\x00\xff" * (n // 2) + blob[8 + n :],
        "length_beyond_file": struct.pack("<Q", len(blob) * 2) + blob[8:],
    }[damage]
    (q / "model.safetensors").write_bytes(out)
    msg = _refused("LOAD-TRUNCATED", q)
    assert "model.safetensors" in msg
    _cli_refused("LOAD-TRUNCATED", "generate", q, "--prompt", "hi", sealed=q)


def test_missing_weights_and_shards(golden: Path, tmp_path: Path) -> None:
    q = _copy(golden, "rtn", tmp_path / "q")
    (q / "model.safetensors").unlink()
    _refused("LOAD-NO-WEIGHTS", q)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (q / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused("LOAD-NO-WEIGHTS", q)
    (q / "model.safetensors.index.json").write_text("{}")
    _refused("LOAD-NO-WEIGHTS", q)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.int16])
def test_wrong_qweight_dtype_is_refused_on_every_backend(
    golden: Path, tmp_path: Path, backend: str, dtype: torch.dtype
) -> None:
    q = _copy(golden, "rtn", tmp_path / "q")
    key = "model.layers.0.self_attn.q_proj.qweight"
    _edit_tensors(q, lambda t: t.update({key: t[key].to(dtype)}))
    msg = _refused("LOAD-DTYPE", q, backend=backend)
    assert key in msg and "int32" in msg


def test_dtype_shape_layout_and_key_errors(golden: Path, tmp_path: Path) -> None:
    q = _copy(golden, "rtn", tmp_path / "q")
    original = load_file(str(q / "model.safetensors"))

    def reset(fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
        _edit_tensors(q, lambda t: (t.clear(), t.update(original), fn(t)))

    reset(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    _refused("LOAD-DTYPE", q)
    reset(lambda t: t.update({"model.layers.1.mlp.up_proj.scales": t["model.layers.1.mlp.up_proj.scales"].int()}))
    _refused("LOAD-DTYPE", q)
    reset(lambda t: t.update({"model.layers.0.mlp.down_proj.qzeros": t["model.layers.0.mlp.down_proj.qzeros"].t()}))
    _refused("LOAD-SHAPE", q)
    reset(lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.float16)}))
    _refused("LOAD-SHAPE", q)
    reset(lambda t: t.update({"model.layers.0.mlp.up_proj.bias": torch.ones(7, dtype=torch.float16)}))
    _refused("LOAD-SHAPE", q)
    reset(lambda t: t.pop("model.norm.weight"))
    _refused("LOAD-MISSING-KEYS", q)
    reset(lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    _refused("LOAD-MISSING-KEYS", q)
    reset(lambda t: t.update({"model.layers.0.mlp.up_proj.weight_packed": torch.zeros(2, 2, dtype=torch.int32)}))
    _refused("LOAD-LAYOUT", q)
    shutil.copy(golden / "src" / "model.safetensors", q / "model.safetensors")  # float weights, awq config
    _refused("LOAD-LAYOUT", q)


@pytest.mark.parametrize(
    "key,value",
    [
        ("model.layers.1.self_attn.v_proj.scales", math.nan),
        ("model.layers.0.mlp.gate_proj.scales", math.inf),
        ("model.embed_tokens.weight", -math.inf),
        ("model.norm.weight", math.nan),
        ("lm_head.weight", math.nan),
        ("model.layers.0.mlp.up_proj.bias", math.nan),
    ],
)
def test_nonfinite_tensors_are_named(golden: Path, tmp_path: Path, key: str, value: float) -> None:
    q = _copy(golden, "rtn", tmp_path / "q")

    def poison(t: dict[str, torch.Tensor]) -> None:
        if key not in t:  # a bias the tiny model lacks: add one (the loader then builds the layer with a bias)
            t[key] = torch.zeros(128, dtype=torch.float16)
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value

    _edit_tensors(q, poison)
    msg = _refused("LOAD-NONFINITE", q, NonFiniteError, backend="torch")
    assert key in msg and "model.safetensors" in msg
    _cli_refused("LOAD-NONFINITE", "generate", q, "--prompt", "hi", sealed=q)


def test_backend_that_cannot_run_the_checkpoint(golden: Path, tmp_path: Path) -> None:
    from awqkit.kernels import cpu_avx2

    q = _copy(golden, "rtn", tmp_path / "q")
    _cli_refused("LOAD-BACKEND", "generate", q, "--prompt", "hi", "--backend", "no-such-kernel", sealed=q)
    _edit_tensors(q, lambda t: t.update({k: v.float() for k, v in t.items() if k.endswith(".scales")}))
    if cpu_avx2.is_available():  # fp32 scales: valid, but the fp16-scale kernel cannot take them
        msg = _refused("LOAD-BACKEND", q, InputError, backend="cpu-avx2")
        assert "float16" in msg
    assert bool(torch.isfinite(load_quantized(q, backend="torch")(torch.tensor([[1, 2, 3]])).logits).all())


def test_float_folder_with_packed_tensors_is_refused_by_eval(golden: Path, tmp_path: Path) -> None:
    from awqkit.eval.runner_load import load_for_eval

    q = _copy(golden, "rtn", tmp_path / "Llama-tiny_AWQ_w4_g32")
    _edit_json(q / "config.json", lambda c: c.pop("quantization_config"))
    (q / "quantization_metadata.json").unlink()
    with pytest.raises(CheckpointError) as info:
        load_for_eval(q)
    assert_error("LOAD-FLOAT-PACKED", str(info.value))
    assert "suggests 'awq'" in str(info.value)
    _cli_refused(
        "LOAD-FLOAT-PACKED",
        "eval",
        q,
        "--text",
        golden / "text.txt",
        "--seq-len",
        "8",
        "--windows",
        "1",
        "--no-progress",
        sealed=q,
    )


# --------------------------------------------------------------------------- evaluation
def test_eval_argument_errors(golden: Path, tmp_path: Path) -> None:
    src, text = golden / "src", golden / "text.txt"
    _cli_refused("EVAL-TASK", "eval", src, "--tasks", "ppl,bogus", sealed=src)
    _cli_refused("EVAL-TASK", "eval", src, "--tasks", ",", sealed=src)
    _cli_refused("EVAL-KL-BASELINE", "eval", src, "--tasks", "kl", sealed=src)
    _cli_refused("EVAL-TEXT-MISSING", "eval", src, "--text", tmp_path / "missing.txt", sealed=src)
    empty, latin1 = tmp_path / "blank.txt", tmp_path / "latin1.txt"
    empty.write_text("\n \n", encoding="utf-8")
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    for bad in (empty, latin1, tmp_path):  # --text is read as it is: it must be a UTF-8 file with text
        _cli_refused("EVAL-TEXT-UNREADABLE", "eval", src, "--text", bad, sealed=src)
    _cli_refused("EVAL-BACKEND", "eval", src, "--text", text, "--backend", "cuda-magic", sealed=src)
    _cli_refused("EVAL-MODEL-MISSING", "eval", tmp_path / "nope", "--text", text)
    _cli_refused("EVAL-MODEL-MISSING", "eval", text, "--text", text)
    _cli_refused("EVAL-MODEL-MISSING", "eval", src, "--baseline", tmp_path, "--text", text)
    _cli_refused("EVAL-SETTINGS", "eval", src, "--text", text, "--seq-len", "1", sealed=src)
    from awqkit.eval.runner import evaluate_model

    with pytest.raises(InputError) as info:  # from Python: an AwqkitError, still a ValueError
        evaluate_model(src, tasks="arc", limit=0)
    assert_error("EVAL-SETTINGS", str(info.value))


def test_eval_kl_needs_the_same_vocabulary(golden: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-vocab"
    save_tiny_llama(other)
    tok = make_tiny_tokenizer(vocab_size=300)
    tok.save_pretrained(other)
    _cli_refused(
        "EVAL-VOCAB",
        "eval",
        golden / "src",
        "--baseline",
        other,
        "--text",
        golden / "text.txt",
        "--seq-len",
        "8",
        "--windows",
        "1",
        "--no-progress",
        sealed=golden / "src",
    )


def test_eval_nonfinite_metric_exits_1_and_still_writes_the_report(golden: Path, tmp_path: Path) -> None:
    """A float folder whose final norm is huge: fp32 hidden states overflow to Inf, the logits turn NaN."""
    huge = _copy(golden, "src", tmp_path / "huge")
    _edit_tensors(huge, lambda t: t.update({"model.norm.weight": torch.full_like(t["model.norm.weight"], 3e38)}))
    before = tree_hash(huge)
    out, md = tmp_path / "res" / "eval.json", tmp_path / "eval.md"
    result = run(
        "eval",
        huge,
        "--text",
        golden / "text.txt",
        "--seq-len",
        "8",
        "--windows",
        "2",
        "--json",
        out,
        "--markdown",
        md,
        "--no-progress",
    )
    assert result.rc == 1, result.err
    line = one_line_error(result, "eval")
    assert_error("EVAL-NONFINITE", line)
    assert "ppl came out NaN/Inf for" in line and str(huge) in line
    assert "## awqkit eval" in result.out and md.read_text() in result.out
    data = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert data["tasks"]["ppl"]["model"]["ppl"] is None and data["nonfinite_metrics"] == ["ppl"]
    assert tree_hash(huge) == before
    # From Python: evaluate_model returns the results, the helper names the metrics
    from awqkit.eval.runner import evaluate_model, nonfinite_metrics

    results = evaluate_model(
        huge, baseline=golden / "src", tasks="ppl,kl", text=golden / "text.txt", seq_len=8, windows=1, progress=False
    )
    assert math.isnan(results["tasks"]["ppl"]["model"]["ppl"])
    assert set(nonfinite_metrics(results)) >= {"ppl", "kl"}
    assert (
        nonfinite_metrics(
            evaluate_model(golden / "src", text=golden / "text.txt", seq_len=8, windows=1, progress=False)
        )
        == []
    )
