"""Tests for awqkit.eval (perplexity, KL, windows, data, resources) and awqkit.report.table."""

from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from awqkit.bench.resources import (
    Timer,
    current_rss_bytes,
    folder_size_bytes,
    fp16_size_bytes,
    peak_rss_bytes,
)
from awqkit.eval import (
    default_data_dir,
    kl_divergence,
    load_wikitext_test,
    make_windows,
    perplexity,
)
from awqkit.report import markdown_table, write_benchmarks_section

VOCAB = 97


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (5, 24), generator=g)


def _hand_nll(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp.gather(1, w[1:, None]).sum().item()
            count += w.numel() - 1
    return total, count


# ----------------------------------------------------------------------------- perplexity / KL


def test_perplexity_matches_hand_computation(tiny_model, windows):
    nll, count = _hand_nll(tiny_model, windows)
    r1 = perplexity(tiny_model, windows, batch_size=1, progress=False)
    r3 = perplexity(tiny_model, windows, batch_size=3, progress=False)
    assert r1["n_tokens"] == count == 5 * 23
    assert r1["nll_sum"] == pytest.approx(nll, rel=1e-6)
    assert r1["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert r3["ppl"] == pytest.approx(r1["ppl"], rel=1e-6)
    assert r3["n_tokens"] == r1["n_tokens"]
    # A random model on random tokens sits near uniform perplexity.
    assert 0.5 * VOCAB < r1["ppl"] < 2 * VOCAB


def test_perplexity_chunked_log_softmax(tiny_model, windows, monkeypatch):
    # ``awqkit.eval.perplexity`` the attribute is the function; fetch the module itself.
    ppl_mod = importlib.import_module("awqkit.eval.perplexity")

    ref = perplexity(tiny_model, windows, progress=False)
    monkeypatch.setattr(ppl_mod, "_CHUNK_ELEMENTS", VOCAB * 5)  # 5 positions per chunk
    chunked = perplexity(tiny_model, windows, batch_size=2, progress=False)
    assert chunked["n_tokens"] == ref["n_tokens"]
    assert chunked["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)


def test_perplexity_rejects_bad_input(tiny_model, windows):
    with pytest.raises(ValueError, match="2-D"):
        perplexity(tiny_model, windows[0], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(tiny_model, windows, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="integer"):
        perplexity(tiny_model, windows.float(), progress=False)


def test_kl_self_is_zero(tiny_model, windows):
    r = kl_divergence(tiny_model, tiny_model, windows, batch_size=2, progress=False)
    p = perplexity(tiny_model, windows, progress=False)
    assert abs(r["kl"]) < 1e-7
    assert r["top1_agreement"] == 1.0
    assert r["ppl_model"] == pytest.approx(p["ppl"], rel=1e-6)
    assert r["ppl_baseline"] == pytest.approx(p["ppl"], rel=1e-6)
    assert r["n_tokens"] == p["n_tokens"]


def test_kl_perturbed_matches_kl_div(tiny_model, windows):
    torch.manual_seed(2)
    perturbed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, param in perturbed.named_parameters():
            if "mlp" in name:
                param.add_(0.5 * torch.randn_like(param))
    one = windows[:1]
    r = kl_divergence(perturbed, tiny_model, one, progress=False)
    with torch.no_grad():
        lp_m = torch.log_softmax(perturbed(one).logits[0, :-1].double(), -1)
        lp_b = torch.log_softmax(tiny_model(one).logits[0, :-1].double(), -1)
    # kl_div(input=log Q, target=log P) = sum P (log P - log Q): KL(P_baseline || P_model).
    expected = F.kl_div(lp_m, lp_b, log_target=True, reduction="none").sum(-1).mean().item()
    agree = (lp_m.argmax(-1) == lp_b.argmax(-1)).double().mean().item()
    reverse = F.kl_div(lp_b, lp_m, log_target=True, reduction="none").sum(-1).mean().item()
    assert r["kl"] > 1e-4
    assert r["kl"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - reverse) > 1e-6 * expected  # the direction test can tell them apart
    assert r["top1_agreement"] == pytest.approx(agree)
    assert r["ppl_model"] == pytest.approx(perplexity(perturbed, one, progress=False)["ppl"], rel=1e-6)


# ----------------------------------------------------------------------------- windows / data


class FakeTokenizer:
    """Whitespace tokenizer returning one id per word (no special tokens)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": [int(tok) for tok in text.split()]}


def test_make_windows_shapes_and_stride():
    text = " ".join(str(i) for i in range(50))
    w = make_windows(FakeTokenizer(), text, seq_len=8)
    assert w.shape == (6, 8) and w.dtype == torch.long
    assert w[0].tolist() == list(range(8))
    assert w[1, 0].item() == 8  # stride = seq_len, no overlap
    assert torch.equal(w.flatten(), torch.arange(48))
    w2 = make_windows(FakeTokenizer(), text, seq_len=8, n_windows=2)
    assert torch.equal(w2, w[:2])
    with pytest.raises(ValueError, match="only 50 tokens"):
        make_windows(FakeTokenizer(), text, seq_len=8, n_windows=7)


def test_make_windows_short_text_errors():
    with pytest.raises(ValueError, match="5 tokens"):
        make_windows(FakeTokenizer(), "0 1 2 3 4", seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        make_windows(FakeTokenizer(), "0 1 2 3 4", seq_len=1)


def test_make_windows_with_hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "mat", "."]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[UNK]")
    text = "the cat sat on the mat . " * 10  # 70 tokens
    w = make_windows(hf, text, seq_len=16)
    assert w.shape == (4, 16)
    assert w[0, :7].tolist() == [1, 2, 3, 4, 1, 5, 6]
    assert w[1, 0].item() == [1, 2, 3, 4, 1, 5, 6][16 % 7]


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AWQKIT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("AWQKIT_DATA")
    repo_root = Path(__file__).resolve().parents[2]
    assert default_data_dir() == (repo_root.parent / "shared" / "data").resolve()


def test_load_wikitext_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.raw"):
        load_wikitext_test(tmp_path / "nope.raw")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_wikitext_test(tmp_path)


def test_load_wikitext_small_file(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_bytes(b" = A = \r\n first row .\r\n\r\n second \r\n")
    assert load_wikitext_test(f) == " = A = \n\n first row .\n\n second "
    assert load_wikitext_test(tmp_path) == load_wikitext_test(f)


def test_load_wikitext_real_file():
    path = default_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    raw = path.read_bytes().decode("utf-8")
    first_row = raw.split("\r\n", 1)[0]
    text = load_wikitext_test()
    assert first_row.strip() == "= Robert Boulter ="
    assert text.startswith(first_row + "\n\n")
    assert "\r" not in text
    assert "\n\n\n" not in text
    assert text.count("\n\n") == sum(1 for r in raw.split("\r\n") if r) - 1


# ----------------------------------------------------------------------------- resources


def test_folder_size_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    (tmp_path / "link.bin").symlink_to(tmp_path / "a.bin")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    assert folder_size_bytes(tmp_path / "sub") == 23
    assert folder_size_bytes(tmp_path / "a.bin") == 100
    assert folder_size_bytes(tmp_path) == 223  # the file symlink counts with its target's size
    with pytest.raises(FileNotFoundError):
        folder_size_bytes(tmp_path / "missing")


def test_fp16_size_bytes_tied_counted_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = nn.Parameter(emb.weight.data)  # distinct Parameter object, same storage
    model = nn.ModuleDict({"emb": emb, "head": head, "proj": nn.Linear(4, 3)})
    assert fp16_size_bytes(model) == 2 * (40 + 12 + 3)

    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    tied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **cfg))
    untied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **cfg))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert fp16_size_bytes(untied) - fp16_size_bytes(tied) == 2 * VOCAB * 32


def test_rss_readings_and_the_peak_tracker(monkeypatch) -> None:
    """No sleeps and no timed assertions: the tracker's samples and the timer's clock are scripted."""
    from awqkit.bench import resources

    assert peak_rss_bytes() >= current_rss_bytes() > 10 * 2**20
    readings = iter([100, 500, 300, 200])  # on entry, two samples in the block, on exit
    monkeypatch.setattr(resources, "current_rss_bytes", lambda: next(readings, 200))
    with resources.PeakRSSTracker(interval=3600.0) as mem:  # the sampling thread never wakes during the test
        mem._sample()
        mem._sample()
    assert (mem.start, mem.peak, mem.delta) == (100, 500, 400)


def test_timer_reads_the_clock_on_entry_and_exit(monkeypatch) -> None:
    from awqkit.bench import resources

    clock = iter([10.0, 11.0, 12.5])
    monkeypatch.setattr(resources.time, "perf_counter", lambda: next(clock))
    with Timer() as t:
        assert t.seconds == 1.0  # running: now - start
    assert t.seconds == 2.5 and t.seconds == 2.5  # fixed after the block


# ----------------------------------------------------------------------------- report


def test_markdown_table_format():
    rows = [
        {"method": "fp16", "ppl": 12.34567, "bits": 16, "kl": None},
        {"method": "awq|g64", "ppl": 13.0, "bits": 4, "kl": 0.0123456, "extra": "x"},
    ]
    out = markdown_table(rows, columns=["method", "bits", "ppl", "kl"], floatfmt={"ppl": ".2f"})
    lines = out.split("\n")
    assert len(lines) == 4
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["method", "bits", "ppl", "kl"]
    assert lines[1] == "| -------- | ---: | ----: | ------: |"
    assert "awq\\|g64" in lines[3]
    assert "12.35" in lines[2] and "13.00" in lines[3]
    assert "0.01235" in lines[3]
    assert lines[2].endswith("|         |")  # None -> empty cell
    auto = markdown_table(rows)
    assert auto.split("\n")[0].split("|")[5].strip() == "extra"
    assert markdown_table(rows, floatfmt={"ppl": "{:.1f}"}).count("13.0") == 1
    with pytest.raises(ValueError, match="floatfmt"):
        markdown_table(rows, floatfmt={"nope": ".2f"})
    with pytest.raises(ValueError, match="none of the rows"):
        markdown_table(rows, columns=["method", "typo"])
    with pytest.raises(ValueError, match="column"):
        markdown_table([])


def test_write_benchmarks_section(tmp_path):
    f = tmp_path / "BENCHMARKS.md"
    f.write_text(
        "# Benchmarks\n\nintro\n\n## A\n\nold a\n\n### A.1\n\nsub\n\n"
        "## B\n\nold b\n```\n## not a heading\n```\n\n## C\n\nold c\n"
    )
    write_benchmarks_section(f, "A", "new a\n")
    text = f.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n## A\n\nnew a\n\n## B\n")
    assert "old a" not in text and "A.1" not in text
    write_benchmarks_section(f, "B", "new b")
    text = f.read_text()
    assert "old b" not in text and "not a heading" not in text
    assert "## A\n\nnew a\n\n## B\n\nnew b\n\n## C\n\nold c\n" in text
    write_benchmarks_section(f, "D", "| x |\n| - |")
    assert f.read_text() == text + "\n## D\n\n| x |\n| - |\n"
    write_benchmarks_section(f, "C", "new c")
    assert f.read_text().endswith("## C\n\nnew c\n\n## D\n\n| x |\n| - |\n")
    new_file = tmp_path / "new.md"
    write_benchmarks_section(new_file, "Only", "body")
    assert new_file.read_text() == "## Only\n\nbody\n"
    with pytest.raises(ValueError, match="section_title"):
        write_benchmarks_section(f, "two\nlines", "x")
