"""``awqkit bench``: structure and arithmetic of the measurements (never their speed), on a tiny Llama."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from awqkit.bench import llamacpp as bench_llamacpp
from awqkit.bench import modes as bench
from awqkit.bench import report as bench_report
from awqkit.bench.modes import BenchConfig, ModeSpec, build_specs
from awqkit.commands.bench_cmd import register

torch.set_num_threads(1)

H, INTER, LAYERS, HEADS, KV_HEADS, GROUP = 64, 128, 2, 4, 2, 32
KV_OUT = H // HEADS * KV_HEADS
LINEARS = [(H, H), (H, KV_OUT), (H, KV_OUT), (H, H), (H, INTER), (H, INTER), (INTER, H)]  # (K, N) q k v o gate up down
SETTINGS = BenchConfig(prompt_tokens=8, new_tokens=4, batch_sizes=(1, 2), repeats=3, warmup=1, threads=1)


def _config(vocab: int, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=vocab,
        tie_word_embeddings=tie,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from awqkit.api import quantize
    from awqkit.config import QuantConfig

    root = tmp_path_factory.mktemp("bench")
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(_config(len(tok))).save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    quantize(root / "src", root / "q", method="rtn", quant=QuantConfig(bits=4, group_size=GROUP), progress=False)
    return {"src": root / "src", "q": root / "q", "vocab": len(tok)}  # type: ignore[dict-item]


def _check_stats(stats: dict, n: int) -> None:
    assert len(stats["samples"]) == n
    assert all(math.isfinite(s) and s > 0 for s in stats["samples"])
    assert stats["median"] == statistics.median(stats["samples"])
    assert stats["min"] == min(stats["samples"]) and stats["max"] == max(stats["samples"])


@pytest.mark.parametrize("backend", ["torch", "cpu-int4"])
def test_measure_mode_structure_and_sizes(folders: dict, backend: str) -> None:
    from awqkit.kernels import cpu_int4

    if backend == "cpu-int4" and not cpu_int4.is_available():
        pytest.skip("cpu-int4 kernel not in this torch build")
    r = bench.measure_mode(ModeSpec("q", str(folders["q"]), True, "float32", backend), SETTINGS)
    assert set(r["batches"]) == {"1", "2"}
    for b, m in r["batches"].items():
        _check_stats(m["prefill_s"], SETTINGS.repeats)
        _check_stats(m["decode_tok_s"], SETTINGS.repeats)
        assert m["weight_bytes_per_step"] > 0 and math.isfinite(m["bandwidth_gb_s"]) and m["bandwidth_gb_s"] > 0
        per_step = m["weight_bytes_per_step"] * m["decode_tok_s"]["median"] / int(b)
        assert m["bandwidth_gb_s"] == pytest.approx(per_step / 1e9)
    assert r["disk_bytes"] == (folders["q"] / "model.safetensors").stat().st_size
    assert r["bytes_per_token"] == r["batches"]["1"]["weight_bytes_per_step"]
    assert 0 < r["rss_after_load_bytes"] <= r["peak_rss_bytes"] and r["peak_vram_bytes"] is None
    assert r["memory_bytes"] > 0 and r["load_s"] > 0 and r["threads"] == 1 and r["backend"] == backend
    json.dumps(r)  # serializable as is


def _float_rest_bytes(vocab: int, batch: int, elem: int = 4) -> int:
    norms = (2 * LAYERS + 1) * H * elem
    return norms + vocab * H * elem + batch * H * elem  # norms + full LM head + looked-up embedding rows


@pytest.mark.parametrize("batch", [1, 8])
def test_bytes_per_step_hand_count(folders: dict, batch: int) -> None:
    from awqkit.io.load import load_quantized
    from awqkit.kernels import cpu_int4

    vocab = folders["vocab"]
    rest = _float_rest_bytes(vocab, batch)
    # torch backend: qweight K*N/8 int32 + qzeros (K/g)*N/8 int32 + scales (K/g)*N fp16
    packed = LAYERS * sum(k * n // 2 + (k // GROUP) * n // 2 + (k // GROUP) * n * 2 for k, n in LINEARS)
    model = load_quantized(folders["q"], backend="torch")
    assert bench.weight_bytes_per_step(model, batch) == packed + rest
    if cpu_int4.is_available():
        # cpu-int4 cache: uint8 [N, K/2] + bf16 scales-and-zeros [K/g, N, 2]
        int4 = LAYERS * sum(k * n // 2 + (k // GROUP) * n * 2 * 2 for k, n in LINEARS)
        model = load_quantized(folders["q"], backend="cpu-int4")
        assert bench.weight_bytes_per_step(model, batch) == int4 + rest
    from awqkit.kernels import cpu_avx2

    if cpu_avx2.is_available():
        # auto: cpu-avx2 blocks (int32 words K*N/8 + fp16 scales + uint8 zeros) where N % 64 == 0, the
        # narrower k/v projections on their packed buffers (cpu-int4 converts lazily), the head in fp16
        avx2 = LAYERS * sum(k * n // 2 + (k // GROUP) * n * 3 for k, n in LINEARS if n % 64 == 0)
        narrow = LAYERS * sum(
            k * n // 2 + (k // GROUP) * n // 2 + (k // GROUP) * n * 2 for k, n in LINEARS if n % 64 != 0
        )
        model = load_quantized(folders["q"], backend="auto")
        assert bench.weight_bytes_per_step(model, batch) == avx2 + narrow + rest - vocab * H * 2
    dense = LlamaForCausalLM.from_pretrained(folders["src"])
    assert bench.weight_bytes_per_step(dense, batch) == LAYERS * sum(4 * k * n for k, n in LINEARS) + rest


def test_bytes_per_step_tied_counts_embedding_once() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(100, tie=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    linears = LAYERS * sum(4 * k * n for k, n in LINEARS)
    norms = (2 * LAYERS + 1) * H * 4
    for batch in (1, 8):
        assert bench.weight_bytes_per_step(model, batch) == linears + norms + 100 * H * 4


def test_memory_and_disk_bytes(folders: dict) -> None:
    dense = LlamaForCausalLM.from_pretrained(folders["src"])
    expected = sum(t.nbytes for t in (*dense.parameters(), *dense.buffers()))
    assert bench.weight_memory_bytes(dense) == expected
    assert bench.disk_weight_bytes(folders["src"]) == (folders["src"] / "model.safetensors").stat().st_size
    assert bench.is_quantized_folder(folders["q"]) and not bench.is_quantized_folder(folders["src"])
    with pytest.raises(FileNotFoundError):
        bench.disk_weight_bytes(folders["src"] / "nope")


def test_time_generation_is_greedy_and_forced_length(folders: dict) -> None:
    model = LlamaForCausalLM.from_pretrained(folders["src"]).eval()
    ids = bench.make_prompt(folders["vocab"], 2, 8, seed=3)
    assert torch.equal(ids, bench.make_prompt(folders["vocab"], 2, 8, seed=3))
    pre, dec, out = bench.time_generation(model, ids, 5)
    assert pre > 0 and dec > 0 and out.shape == (2, 6)
    ref = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out, ref[:, 8:])


def test_subprocess_peak_rss_is_its_own() -> None:
    """ru_maxrss of a child starts at its parent's RSS at fork; the bench's peak must not."""
    import subprocess
    import sys

    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page
    parent = bench.current_rss_bytes()
    code = "from awqkit.bench.modes import process_peak_rss_bytes as p; print(p())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < parent - 300 * 2**20
    del ballast


def _gguf(path: Path, tied: bool, vocab: int = 64, n_embd: int = 32) -> int:
    from gguf import GGUFWriter

    w = GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((vocab, n_embd), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((n_embd, n_embd), dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((vocab, n_embd), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return vocab * n_embd * 2


def test_gguf_bytes_per_step(tmp_path: Path) -> None:
    emb = _gguf(tmp_path / "tied.gguf", tied=True)
    q = 32 * 32 * 4
    assert bench_llamacpp.gguf_tensor_bytes(tmp_path / "tied.gguf", 1) == (emb + q, emb + q)
    _gguf(tmp_path / "untied.gguf", tied=False)
    assert bench_llamacpp.gguf_tensor_bytes(tmp_path / "untied.gguf", 2) == (2 * emb + q, emb + q + 2 * 32 * 2)


def test_build_specs(folders: dict) -> None:
    specs = build_specs(
        str(folders["q"]), str(folders["src"]), ["torch", "cpu-int4"], "float32", ["float32", "bfloat16"]
    )
    assert [(s.quantized, s.dtype, s.backend) for s in specs] == [
        (False, "float32", None),
        (False, "bfloat16", None),
        (True, "float32", "torch"),
        (True, "float32", "cpu-int4"),
    ]
    assert len({s.label for s in specs}) == 4
    with pytest.raises(ValueError, match="quantized"):
        build_specs(str(folders["q"]), str(folders["q"]), ["torch"], "float32", ["float32"])
    with pytest.raises(ValueError, match="dtype"):
        build_specs(str(folders["q"]), None, ["torch"], "float64", ["float32"])


def test_build_specs_with_the_awqkit_loop(folders: dict) -> None:
    specs = build_specs(
        str(folders["q"]),
        str(folders["src"]),
        ["auto"],
        "float32",
        ["float32", "bfloat16"],
        loops=["transformers", "awqkit"],
    )
    # the awqkit loop runs float32 only: no bf16 row for it
    assert [(s.loop, s.dtype, s.quantized) for s in specs] == [
        ("transformers", "float32", False),
        ("transformers", "bfloat16", False),
        ("transformers", "float32", True),
        ("awqkit", "float32", False),
        ("awqkit", "float32", True),
    ]
    assert all(s.label.endswith("[awqkit loop]") == (s.loop == "awqkit") for s in specs)
    with pytest.raises(ValueError, match="decode loops"):
        build_specs(str(folders["q"]), None, ["auto"], "float32", ["float32"], loops=["vllm"])
    with pytest.raises(ValueError, match="no mode to measure"):
        build_specs(str(folders["q"]), None, ["auto"], "bfloat16", ["float32"], loops=["awqkit"])


def test_awqkit_loop_decodes_the_same_tokens(folders: dict) -> None:
    """Both loops time the same greedy decoding: equal tokens from the same prompt."""
    from awqkit.io.load import load_quantized
    from awqkit.runtime.decoder import Decoder

    model = load_quantized(folders["q"], device="cpu", dtype=torch.float32, backend="auto")
    ids = bench.make_prompt(folders["vocab"], 2, 8)
    _, _, ref = bench.time_generation(model, ids, 5)
    p, d, toks = bench.time_decoder(Decoder(model), ids, 5)
    assert torch.equal(toks, ref) and p > 0 and d > 0
    r = bench.measure_mode(ModeSpec("q", str(folders["q"]), True, "float32", "auto", loop="awqkit"), SETTINGS)
    assert r["loop"] == "awqkit" and set(r["batches"]) == {"1", "2"}
    _check_stats(r["batches"]["2"]["decode_tok_s"], SETTINGS.repeats)


def _fake(label: str, tok_s: float) -> dict:
    stats = {"median": tok_s, "min": tok_s, "max": tok_s, "samples": [tok_s]}
    pre = {"median": 0.01, "min": 0.01, "max": 0.01, "samples": [0.01]}
    return {
        "label": label,
        "disk_bytes": 2e6,
        "memory_bytes": 3e6,
        "peak_rss_bytes": 4e8,
        "bytes_per_token": 1e6,
        "peak_vram_bytes": None,
        "batches": {"1": {"prefill_s": pre, "decode_tok_s": stats, "bandwidth_gb_s": 0.1}},
    }


def test_report_table_ratio_and_skipped_rows(tmp_path: Path) -> None:
    results = [_fake("fp32", 10.0), _fake("int4", 35.0), {"label": "llama.cpp", "skipped": "not installed; hint"}]
    table = bench_report.format_table(results)
    assert "| fp32" in table and "35.0" in table and "llama.cpp (skipped)" in table
    assert bench_report.decode_ratio(results, "int4", "fp32") == pytest.approx(3.5)
    assert bench_report.decode_ratio(results, "int4", "llama.cpp") is None
    pytest.importorskip("matplotlib")
    bench_report.plot_png(tmp_path / "b.png", results)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # subprocesses; CI runs it once with `pytest -m slow`
def test_cli_bench_writes_json(
    folders: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Real path: each mode in its own subprocess; llama.cpp asked for but reported as skipped."""
    monkeypatch.setattr(bench_llamacpp, "unavailable_reason", lambda: "llama-cpp-python is not installed")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register(sub)
    out = tmp_path / "bench.json"
    a = p.parse_args(
        [
            "bench",
            str(folders["q"]),
            "--baseline",
            str(folders["src"]),
            "--backend",
            "torch",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "3",
            "--batch-sizes",
            "1",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
            str(out),
            "--llama-cpp",
            str(gguf),
        ]
    )
    assert a.func(a) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["batch_sizes"] == [1] and doc["environment"]["torch"] == torch.__version__
    labels = [r["label"] for r in doc["results"]]
    # default loops: transformers, then awqkit's
    assert labels == [
        "src fp32 dense",
        "q int4 (torch)",
        "src fp32 dense [awqkit loop]",
        "q int4 (torch) [awqkit loop]",
        "llama.cpp Q4_1",
    ]
    assert doc["results"][4]["skipped"].startswith("llama-cpp-python")
    for r in doc["results"][:4]:
        _check_stats(r["batches"]["1"]["decode_tok_s"], 2)
        assert r["peak_rss_bytes"] > 0
    assert set(doc["ratios"]) == {
        "q int4 (torch) / src fp32 dense decode B=1",
        "q int4 (torch) [awqkit loop] / src fp32 dense [awqkit loop] decode B=1",
        "q int4 (torch) [awqkit loop] / src fp32 dense decode B=1",
    }
    assert "q int4 (torch)" in capsys.readouterr().out
