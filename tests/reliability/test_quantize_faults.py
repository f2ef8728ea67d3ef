"""Every catalogued fault of ``awqkit quantize``: a one-line error that matches docs/errors.md, exit status 2,
and nothing outside the output changed (the source, the calibration file and any existing ``--dst`` hash the
same before and after; no hidden staged folder is left beside ``--dst``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_harness import one_line_error, run, tree_hash
from conftest import TINY_CORPUS, save_tiny_llama
from errors_catalogue import assert_error
from safetensors.torch import load_file, save_file

RTN = ["--method", "rtn", "--group-size", "32"]
AWQ = [
    "--method",
    "awq",
    "--group-size",
    "32",
    "--n-samples",
    "2",
    "--seq-len",
    "16",
    "--n-grid",
    "2",
    "--search-samples",
    "1",
    "--search-tokens",
    "16",
]


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    save_tiny_llama(root / "src", max_position_embeddings=64)
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 4) + "\n")
    return root


class Env:
    """A working folder with a copy of the tiny source and a calibration file; ``sealed`` are hashed."""

    def __init__(self, golden: Path, tmp: Path) -> None:
        self.root = tmp
        self.src = tmp / "models" / "tiny"
        shutil.copytree(golden / "src", self.src)
        self.calib = tmp / "calib.txt"
        shutil.copy(golden / "calib.txt", self.calib)
        self.dst = tmp / "out" / "tiny-q"
        self.sealed: list[Path] = [self.src, self.calib]

    def quantize(self, *extra: Any, dst: Path | str | None = None, method: list[str] = RTN) -> list[str]:
        return [
            "quantize",
            "--src",
            str(self.src),
            "--dst",
            str(self.dst if dst is None else dst),
            "--calib",
            str(self.calib),
            *method,
            *map(str, extra),
        ]

    def awqkit_output(self, folder: Path) -> Path:
        """A folder that looks like a previous awqkit output (it holds quantization_metadata.json)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "quantization_metadata.json").write_text('{"method": "rtn"}\n')
        (folder / "model.safetensors").write_bytes(b"previous output")
        self.sealed.append(folder)
        return folder

    def edit_config(self, fn: Callable[[dict[str, Any]], None]) -> None:
        cfg = json.loads((self.src / "config.json").read_text())
        fn(cfg)
        (self.src / "config.json").write_text(json.dumps(cfg))

    def edit_weights(self, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
        sd = load_file(str(self.src / "model.safetensors"))
        fn(sd)
        save_file(sd, str(self.src / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture
def env(golden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return Env(golden, tmp_path)


def _nan(sd: dict[str, torch.Tensor], key: str) -> None:
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = float("nan")


def _no_hub(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    import huggingface_hub

    def model_info(*a: Any, **k: Any) -> None:
        raise exc

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)


def _repo_not_found() -> BaseException:
    from huggingface_hub.errors import RepositoryNotFoundError

    return RepositoryNotFoundError.__new__(RepositoryNotFoundError)


# (catalogue id, setup(env, monkeypatch) -> argv). Each setup makes the fault; the test checks the rest.
Setup = Callable[[Env, pytest.MonkeyPatch], list[str]]
CASES: list[tuple[str, Setup]] = [
    ("DST-EXISTS", lambda e, m: e.quantize(dst=e.awqkit_output(e.dst))),
    (
        "DST-NOT-AWQKIT",
        lambda e, m: (
            e.dst.mkdir(parents=True),
            (e.dst / "notes.txt").write_text("mine"),
            e.sealed.append(e.dst),
            e.quantize("--overwrite"),
        )[-1],
    ),
    ("DST-IS-SOURCE", lambda e, m: e.quantize("--overwrite", dst=e.src)),
    ("DST-CONTAINS-SOURCE", lambda e, m: e.quantize("--overwrite", dst=e.src.parent)),
    (
        "DST-CWD",
        lambda e, m: ((e.root / "work").mkdir(), m.chdir(e.root / "work"), e.quantize("--overwrite", dst="."))[-1],
    ),
    (
        "DST-HOME",
        lambda e, m: (
            m.setenv("HOME", str(e.awqkit_output(e.root / "home"))),
            e.quantize("--overwrite", dst=e.root / "home"),
        )[-1],
    ),
    ("DST-ROOT", lambda e, m: e.quantize("--overwrite", dst="/")),
    (
        "DST-SYMLINK",
        lambda e, m: (
            e.awqkit_output(e.root / "real"),
            e.dst.parent.mkdir(),
            e.dst.symlink_to(e.root / "real"),
            e.quantize("--overwrite"),
        )[-1],
    ),
    (
        "DST-FILE",
        lambda e, m: (
            e.dst.parent.mkdir(),
            e.dst.write_text("a file"),
            e.sealed.append(e.dst),
            e.quantize("--overwrite"),
        )[-1],
    ),
    (
        "DST-NOT-WRITABLE",
        lambda e, m: (
            (e.root / "afile").write_text("x"),
            e.sealed.append(e.root / "afile"),
            e.quantize(dst=e.root / "afile" / "out"),
        )[-1],
    ),
    (
        "DST-NO-SPACE",
        lambda e, m: (
            m.setattr(
                "awqkit.io.destination.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000)
            ),
            e.quantize(),
        )[-1],
    ),
    (
        "DST-BUSY",
        lambda e, m: (
            e.dst.parent.mkdir(),
            (e.dst.parent / ".tiny-q.awqkit-commit.json").write_text(
                json.dumps(
                    {"pid": os.getpid(), "host": os.uname().nodename, "staged": "x", "recovery": "y", "staged_inode": 1}
                )
            ),
            e.quantize(),
        )[-1],
    ),
    (
        "DST-JOURNAL",
        lambda e, m: (
            e.dst.parent.mkdir(),
            (e.dst.parent / ".tiny-q.awqkit-commit.json").write_text("{not json"),
            e.quantize(),
        )[-1],
    ),
    ("SRC-MISSING", lambda e, m: e.quantize()[:2] + ["./nowhere/at/all"] + e.quantize()[3:]),
    ("SRC-MISTYPED", lambda e, m: e.quantize()[:2] + ["models/tinny"] + e.quantize()[3:]),
    (
        "SRC-HUB-UNREACHABLE",
        lambda e, m: (
            _no_hub(m, ConnectionError("Name or service not known")),
            e.quantize()[:2] + ["someone/some-model"] + e.quantize()[3:],
        )[-1],
    ),
    (
        "SRC-HUB-UNKNOWN",
        lambda e, m: (_no_hub(m, _repo_not_found()), e.quantize()[:2] + ["someone/some-model"] + e.quantize()[3:])[-1],
    ),
    (
        "SRC-HUB-OFFLINE",
        lambda e, m: (m.setenv("HF_HUB_OFFLINE", "1"), e.quantize()[:2] + ["someone/some-model"] + e.quantize()[3:])[
            -1
        ],
    ),
    ("SRC-NO-CONFIG", lambda e, m: ((e.src / "config.json").unlink(), e.quantize())[-1]),
    ("SRC-NO-WEIGHTS", lambda e, m: ((e.src / "model.safetensors").unlink(), e.quantize())[-1]),
    ("SRC-NOT-GGUF", lambda e, m: e.quantize()[:2] + [str(e.src / "config.json")] + e.quantize()[3:]),
    (
        "SRC-QUANTIZED",
        lambda e, m: (
            e.edit_config(lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
            e.quantize(),
        )[-1],
    ),
    (
        "SRC-ARCH",
        lambda e, m: (e.edit_config(lambda c: c.update(architectures=["FancyNewForCausalLM"])), e.quantize())[-1],
    ),
    ("SRC-CONFIG-FIELDS", lambda e, m: (e.edit_config(lambda c: c.pop("hidden_size")), e.quantize())[-1]),
    ("SRC-CONFIG-JSON", lambda e, m: ((e.src / "config.json").write_text("[1, 2]"), e.quantize())[-1]),
    (
        "SRC-TRUNCATED",
        lambda e, m: (
            (e.src / "model.safetensors").write_bytes((e.src / "model.safetensors").read_bytes()[:-100]),
            e.quantize(),
        )[-1],
    ),
    (
        "SRC-SHARD-MISSING",
        lambda e, m: (
            (e.src / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
            ),
            e.quantize(),
        )[-1],
    ),
    (
        "SRC-NONFINITE",
        lambda e, m: (e.edit_weights(lambda sd: _nan(sd, "model.embed_tokens.weight")), e.quantize())[-1],
    ),
    (
        "SRC-LOAD-FAILED",
        lambda e, m: (
            (e.src / "model.safetensors").unlink(),
            (e.src / "pytorch_model.bin").write_bytes(b"not a pickle at all"),
            e.quantize(),
        )[-1],
    ),
    ("CALIB-MISSING", lambda e, m: e.quantize(method=AWQ)[:6] + ["nothing.txt"] + e.quantize(method=AWQ)[7:]),
    ("CALIB-EMPTY", lambda e, m: (e.calib.write_text(""), e.quantize(method=AWQ))[-1]),
    ("CALIB-NOT-UTF8", lambda e, m: (e.calib.write_bytes(b"caf\xe9 au lait\n" * 20), e.quantize(method=AWQ))[-1]),
    (
        "CALIB-BAD-JSON",
        lambda e, m: (
            (e.root / "c.jsonl").write_text('{"text": "a"}\n{oops\n'),
            e.sealed.append(e.root / "c.jsonl"),
            e.quantize(method=AWQ)[:6] + [str(e.root / "c.jsonl")] + e.quantize(method=AWQ)[7:],
        )[-1],
    ),
    (
        "CALIB-COLUMN",
        lambda e, m: (
            (e.root / "c.jsonl").write_text('{"question": "a b c"}\n' * 30),
            e.sealed.append(e.root / "c.jsonl"),
            e.quantize("--prompt-column", "prompt", method=AWQ)[:6]
            + [str(e.root / "c.jsonl")]
            + e.quantize("--prompt-column", "prompt", method=AWQ)[7:],
        )[-1],
    ),
    ("SEQ-LEN", lambda e, m: e.quantize("--seq-len", "128", method=AWQ)),
    ("CALIB-TOO-SHORT", lambda e, m: (e.calib.write_text("hello world\n"), e.quantize(method=AWQ))[-1]),
    ("DEVICE-NAME", lambda e, m: e.quantize("--device", "gpu0")),
    (
        "DEVICE-UNAVAILABLE",
        lambda e, m: (m.setattr(torch.cuda, "is_available", lambda: False), e.quantize("--device", "cuda"))[-1],
    ),
    (
        "DEVICE-INDEX",
        lambda e, m: (
            m.setattr(torch.cuda, "is_available", lambda: True),
            m.setattr(torch.cuda, "device_count", lambda: 1),
            e.quantize("--device", "cuda:3"),
        )[-1],
    ),
    ("SET-BITS", lambda e, m: e.quantize("--bits", "9")),
    ("SET-GROUP", lambda e, m: e.quantize("--group-size", "100")),
    ("SET-UNALIGNED", lambda e, m: e.quantize("--group-size", "128")),
    ("SET-FUSED-SPLIT", lambda e, m: e.quantize("--modules-to-not-convert", "q_proj")),
    ("SET-FORMAT", lambda e, m: e.quantize("--format", "gemm", "--bits", "3")),
    ("SET-BITS-OVERRIDE", lambda e, m: e.quantize("--bits-override", "gate=8")),
    ("SET-FUSED-BITS", lambda e, m: e.quantize("--bits-override", "q_proj=8")),
    ("SET-METHOD-ROUNDING", lambda e, m: e.quantize("--rounding", "adaround", method=["--method", "awq-gptq"])),
    ("SET-NOTHING-LEFT", lambda e, m: e.quantize("--modules-to-not-convert", "re:.*")),
    ("SET-LM-HEAD", lambda e, m: e.quantize("--no-keep-lm-head-fp16")),
    ("SET-SEARCH", lambda e, m: e.quantize("--n-grid", "1")),
    ("SET-CALIB", lambda e, m: e.quantize("--n-samples", "0", method=AWQ)),
    ("SET-BASE-MODEL", lambda e, m: e.quantize("--base-model", str(e.src))),
]


def _siblings(env: Env) -> list[str]:
    parent = env.dst.parent
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) if parent.is_dir() else []


@pytest.mark.parametrize("error_id,setup", CASES, ids=[c[0] for c in CASES])
def test_fault_is_one_line_exit_2_and_changes_nothing(
    error_id: str, setup: Setup, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = setup(env, monkeypatch)
    before = {p: tree_hash(p) for p in env.sealed}
    journal_before = _siblings(env)
    result = run(*argv)
    assert result.rc == 2, (result.rc, result.err)
    assert_error(error_id, one_line_error(result, "quantize"))
    assert {p: tree_hash(p) for p in env.sealed} == before
    assert _siblings(env) == journal_before  # no staged or recovery folder left behind
    if error_id not in (
        "DST-EXISTS",
        "DST-NOT-AWQKIT",
        "DST-FILE",
        "DST-SYMLINK",
        "DST-IS-SOURCE",
        "DST-CONTAINS-SOURCE",
        "DST-CWD",
        "DST-HOME",
        "DST-ROOT",
        "DST-BUSY",
        "DST-JOURNAL",
    ):
        assert not env.dst.parent.exists()  # not even the output's parent folder was created


def test_verbose_shows_the_traceback(env: Env) -> None:
    result = run("-v", *env.quantize("--bits", "9"))
    assert result.rc == 2 and "Traceback" in result.err
    assert_error("SET-BITS", result.err)


def test_nan_in_a_quantized_weight_fails_before_the_search(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import awqkit.api
    import awqkit.engine

    env.edit_weights(lambda sd: _nan(sd, "model.layers.1.mlp.down_proj.weight"))
    called: list[int] = []
    monkeypatch.setattr(awqkit.engine, "run_awq", lambda *a, **k: called.append(1))
    monkeypatch.setattr(awqkit.api, "load_calibration", lambda *a, **k: called.append(2))
    argv = env.quantize(method=AWQ)
    argv[argv.index("--calib") + 1] = "self"
    result = run(*argv)
    assert result.rc == 2 and not called  # neither calibration (here: data-free generation) nor the search ran
    assert_error("SRC-NONFINITE", one_line_error(result, "quantize"))
    assert "model.layers.1.mlp.down_proj.weight" in result.err


def test_disk_full_while_writing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from awqkit.io.shards import ShardWriter

    previous = env.awqkit_output(env.dst)
    before = tree_hash(previous)

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(ShardWriter, "write", full)
    result = run(*env.quantize("--overwrite"))
    assert result.rc == 2
    assert_error("DST-WRITE-FAILED", one_line_error(result, "quantize"))
    assert tree_hash(previous) == before and _siblings(env) == []


def test_interrupted_save_removes_the_staged_output(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from awqkit.io.shards import ShardWriter

    previous = env.awqkit_output(env.dst)
    before = tree_hash(previous)

    def stop(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", stop)
    result = run(*env.quantize("--overwrite"))
    assert result.rc == 130
    assert_error("RUN-INTERRUPTED", result.err)
    assert tree_hash(previous) == before and _siblings(env) == []


def test_overwrite_replaces_an_awqkit_output_and_only_that(env: Env) -> None:
    env.awqkit_output(env.dst)
    env.sealed.remove(env.dst)
    before = {p: tree_hash(p) for p in env.sealed}
    result = run(*env.quantize("--overwrite"))
    assert result.rc == 0, result.err
    meta = json.loads((env.dst / "quantization_metadata.json").read_text())
    assert meta["method"] == "rtn" and "files" in meta and _siblings(env) == []
    assert {p: tree_hash(p) for p in env.sealed} == before
