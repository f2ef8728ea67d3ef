"""``awqkit`` command line: quantize, generate, demo, plus the subcommands in :mod:`awqkit.commands`.
Defaults come from the config dataclasses.

Only the command layer (this module and ``awqkit.commands``) prints; everything else logs. The command layer is
also the one place (besides optional dependencies) that imports inside functions: each command loads its
implementation when it runs, so ``awqkit --help`` and argument errors stay fast and do not import torch.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from awqkit.config import (
    FORMATS,
    PROPAGATE_MODES,
    RANK_BY,
    REFINE_INITS,
    REFINE_TARGETS,
    ROUNDINGS,
    SCALE_MODES,
    CalibConfig,
    QuantConfig,
    SearchConfig,
    defaults,
    parse_bits_override,
)
from awqkit.errors import AwqkitError
from awqkit.spec import QuantMethod

Q, C, S = defaults(QuantConfig), defaults(CalibConfig), defaults(SearchConfig)
METHODS = tuple(m.value for m in QuantMethod if m.quantizes)


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=Q["bits"], help="weight bits, 2..8 (default %(default)s)")
    p.add_argument(
        "--group-size",
        type=int,
        default=Q["group_size"],
        help="input channels per scale: 32/64/128/256 or -1 per channel (default %(default)s)",
    )
    p.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero point)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=Q["format"],
        help="checkpoint format: AutoAWQ gemm (4 bits only; vllm serve DIR --quantization awq) or "
        "compressed-tensors pack-quantized (any bits, mixed bits; vllm serve DIR); auto: gemm at 4 bits "
        "without --bits-override, else compressed-tensors (default %(default)s)",
    )
    p.add_argument(
        "--bits-override",
        action="append",
        default=[],
        metavar="PATTERN=BITS",
        help="give the linears PATTERN matches another width (mixed bits, compressed-tensors): a full or "
        "trailing module name (down_proj) or re:REGEX matching the full name; repeatable, the last match wins",
    )
    p.add_argument(
        "--keep-lm-head-fp16",
        action=argparse.BooleanOptionalAction,
        default=Q["keep_lm_head_fp16"],
        help="keep the LM head and embeddings in fp16 (always on: awqkit never quantizes them)",
    )
    p.add_argument(
        "--keep-unaligned-fp16",
        action="store_true",
        help="keep linears whose sizes do not fit the group size in fp16 instead of failing",
    )
    p.add_argument(
        "--modules-to-not-convert",
        nargs="*",
        default=[],
        help="exact module names, leaf names or re:REGEX patterns to keep in float",
    )


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        default=C["source"],
        help="calibration: a text file (one prompt per line), training rows (JSONL/JSON/CSV/TSV/Parquet or a "
        "datasets save_to_disk folder), or 'self' "
        "(data-free, sampled from the model) (default %(default)s)",
    )
    p.add_argument("--n-samples", type=int, default=C["n_samples"], help="calibration blocks (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=C["seq_len"], help="tokens per block (default %(default)s)")
    p.add_argument("--seed", type=int, default=C["seed"], help="seed (default %(default)s)")
    for col in ("prompt", "response", "messages", "text"):
        p.add_argument(f"--{col}-column", default=None, help=f"column holding the {col} in JSONL/CSV rows")
    p.add_argument("--system-prompt", default=None, help="system prompt for chat-rendered rows")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scale-mode",
        choices=SCALE_MODES,
        default=S["scale_mode"],
        help="s = x^a (x), x^a / w^(1-a) (duo) or both (default %(default)s)",
    )
    p.add_argument("--n-grid", type=int, default=S["n_grid"], help="alpha grid points in [0,1] (default %(default)s)")
    p.add_argument(
        "--search-samples",
        type=int,
        default=S["search_samples"],
        help="blocks scoring attention candidates (default %(default)s)",
    )
    p.add_argument(
        "--search-tokens",
        type=int,
        default=S["search_tokens"],
        help="tokens scoring MLP candidates (default %(default)s)",
    )
    p.add_argument(
        "--no-scales",
        dest="scales",
        action="store_false",
        help="skip the scale search (no scaling: what --method gptq/adaround do)",
    )
    p.add_argument("--no-clip", action="store_true", help="skip the weight-clipping search")
    p.add_argument(
        "--clip-n-grid", type=int, default=S["clip_n_grid"], help="clip shrink steps of 1/N (default %(default)s)"
    )
    p.add_argument(
        "--clip-max-shrink",
        type=float,
        default=S["clip_max_shrink"],
        help="largest clip shrink, range shrinks down to 1 - this (default %(default)s)",
    )
    p.add_argument(
        "--clip-n-tokens",
        type=int,
        default=S["clip_n_tokens"],
        help="tokens scoring clip candidates; 0 = every calibration token (default %(default)s)",
    )
    p.add_argument(
        "--clip-independent",
        action=argparse.BooleanOptionalAction,
        default=S["clip_independent"],
        help="also shrink the min and the max end of each group alone (default %(default)s)",
    )
    p.add_argument(
        "--gqa-v-o",
        action=argparse.BooleanOptionalAction,
        default=S["gqa_v_o"],
        help="scale v_proj -> o_proj under grouped-query attention, tied per kv head (default %(default)s)",
    )
    p.add_argument(
        "--propagate",
        choices=PROPAGATE_MODES,
        default=S["propagate"],
        help="next layer sees the quantized or the float outputs (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=S["batch_size"], help="blocks per forward (default %(default)s)")
    p.add_argument(
        "--rank-top-k",
        type=int,
        default=S["rank_top_k"],
        help="attention/MLP scale candidates scored on the full objective after a cheap ranking pass "
        "over the whole grid; 0 scores every candidate (default %(default)s)",
    )
    p.add_argument(
        "--rank-by",
        choices=RANK_BY,
        default=S["rank_by"],
        help="how the grid is ranked before exact scoring: the same objective on --rank-tokens tokens "
        "(subset) or the linears' own output error from Gram blocks (gram) (default %(default)s)",
    )
    p.add_argument(
        "--rank-tokens",
        type=int,
        default=S["rank_tokens"],
        help="tokens of the ranking pass with --rank-by subset (default %(default)s)",
    )
    p.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default=S["rounding"],
        help="choose each linear's integers after the scales and clips to minimise its output error: gptq or "
        "adaround; refine: learn every layer's rounding and clipping range against the float layer's output "
        "(none: round to nearest) (default %(default)s)",
    )
    p.add_argument(
        "--refine-iters",
        "--iters",
        dest="refine_iters",
        type=int,
        default=S["refine_iters"],
        help="--rounding refine: signed-gradient steps per decoder layer, one calibration batch each; more steps "
        "trade time for quality (default %(default)s)",
    )
    p.add_argument(
        "--refine-batch-size",
        type=int,
        default=S["refine_batch_size"],
        help="--rounding refine: calibration sequences per step (default %(default)s)",
    )
    p.add_argument(
        "--refine-target",
        choices=REFINE_TARGETS,
        default=S["refine_target"],
        help="--rounding refine: match the float layer on the same inputs (layer) or the float model's "
        "activations (model: also undoes the earlier layers' error) (default %(default)s)",
    )
    p.add_argument(
        "--refine-init",
        choices=REFINE_INITS,
        default=S["refine_init"],
        help="--rounding refine: start at AWQ's round to nearest (rtn) or at GPTQ's integers (gptq) "
        "(default %(default)s)",
    )
    p.add_argument(
        "--refine-lr",
        type=float,
        default=S["refine_lr"],
        help="--rounding refine: step size (default 1 / --refine-iters)",
    )
    p.add_argument(
        "--refine-norms",
        type=float,
        default=S["refine_norms"],
        help="--rounding refine: also learn the weights of the norms feeding the quantized linears, each channel "
        "within [1 - R, 1 + R] of its value (0: off) (default %(default)s)",
    )
    p.add_argument(
        "--rounding-iters",
        type=int,
        default=S["rounding_iters"],
        help="AdaRound optimisation steps per linear (default %(default)s)",
    )
    p.add_argument(
        "--gptq-damp", type=float, default=S["gptq_damp"], help="GPTQ dampening, x mean(diag H) (default %(default)s)"
    )
    p.add_argument(
        "--gptq-act-order",
        action=argparse.BooleanOptionalAction,
        default=S["gptq_act_order"],
        help="GPTQ: columns in order of decreasing input energy (default %(default)s)",
    )


def _configs(a: argparse.Namespace) -> tuple[QuantConfig, CalibConfig, SearchConfig]:
    quant = QuantConfig(
        bits=a.bits,
        group_size=a.group_size,
        zero_point=not a.symmetric,
        modules_to_not_convert=tuple(a.modules_to_not_convert),
        keep_unaligned_fp16=a.keep_unaligned_fp16,
        keep_lm_head_fp16=a.keep_lm_head_fp16,
        format=a.format,
        bits_overrides=tuple(parse_bits_override(text) for text in a.bits_override),
    )
    calib = CalibConfig(
        source=a.calib,
        n_samples=a.n_samples,
        seq_len=a.seq_len,
        seed=a.seed,
        prompt_column=a.prompt_column,
        response_column=a.response_column,
        messages_column=a.messages_column,
        text_column=a.text_column,
        system_prompt=a.system_prompt,
    )
    search = SearchConfig(
        n_grid=a.n_grid,
        scale_mode=a.scale_mode,
        search_samples=a.search_samples,
        search_tokens=a.search_tokens,
        scales=a.scales,
        clip=not a.no_clip,
        propagate=a.propagate,
        batch_size=a.batch_size,
        clip_n_tokens=a.clip_n_tokens,
        clip_n_grid=a.clip_n_grid,
        clip_max_shrink=a.clip_max_shrink,
        clip_independent=a.clip_independent,
        gqa_v_o=a.gqa_v_o,
        rank_top_k=a.rank_top_k,
        rank_by=a.rank_by,
        rank_tokens=a.rank_tokens,
        rounding=a.rounding,
        rounding_iters=a.rounding_iters,
        refine_iters=a.refine_iters,
        refine_lr=a.refine_lr,
        refine_batch_size=a.refine_batch_size,
        refine_target=a.refine_target,
        refine_init=a.refine_init,
        refine_norms=a.refine_norms,
        gptq_damp=a.gptq_damp,
        gptq_act_order=a.gptq_act_order,
    )
    return quant, calib, search


def cmd_quantize(a: argparse.Namespace) -> int:
    from awqkit.api import quantize
    from awqkit.parallel import init_from_env, rank_device

    quant, calib, search = _configs(a)
    # under torchrun: join the process group (gloo on CPU, NCCL with one GPU per rank) and search data-parallel
    device = rank_device(a.device)
    par = init_from_env(device)  # SINGLE when not launched by torchrun (the device is checked later)
    report = quantize(
        a.src,
        a.dst,
        method=a.method,
        quant=quant,
        calib=calib,
        search=search,
        device=device,
        overwrite=a.overwrite,
        trust_remote_code=a.trust_remote_code,
        parallel=par,
        base_model=a.base_model,
    )
    if par.is_writer:
        ranks = f", {par.world} data-parallel ranks" if par.active else ""
        print(
            f"wrote {report.path} ({a.method}, w{quant.bits}{'+' if quant.bits_overrides else ''} g{quant.group_size}, "
            f"{quant.output_format}) in {report.seconds:.1f} s, "
            f"peak RSS {report.peak_rss_bytes / 1e9:.2f} GB{ranks}"
        )
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from awqkit.io.load import load_quantized
    from awqkit.nn import hf

    model = load_quantized(a.path, backend=a.backend)
    tok = AutoTokenizer.from_pretrained(a.path)
    text = a.prompt
    if a.chat and tok.chat_template:
        text = tok.apply_chat_template(
            [{"role": "user", "content": a.prompt}], tokenize=False, add_generation_prompt=True
        )
    ids = tok(text, return_tensors="pt", add_special_tokens=not a.chat)
    with torch.inference_mode():
        out = hf.generate(model, **ids, max_new_tokens=a.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from awqkit.demo import run_demo

    table = run_demo(
        work=Path(a.work) if a.work else None, n_samples=a.n_samples, windows=a.windows, group_size=a.group_size
    )
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awqkit", description="AWQ quantization for Hugging Face causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model (AWQ, RTN, GPTQ, ...) into an AutoAWQ-GEMM checkpoint")
    q.add_argument(
        "--method",
        choices=METHODS,
        default="awq",
        help="awq; rtn (no data); gptq or adaround (rounding alone); awq-gptq or awq-refine (AWQ, then GPTQ "
        "rounding or block refinement) (default %(default)s)",
    )
    q.add_argument("--src", required=True, help="HF folder, .gguf file or hub id")
    q.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    q.add_argument(
        "--base-model",
        default=None,
        metavar="OWNER/NAME",
        help="the source model's Hugging Face Hub id, for the model card's base_model (default: the id the "
        "source names in training_metadata.json or config.json, if any; never a local path)",
    )
    q.add_argument(
        "--device",
        default="cpu",
        help="compute device for the layer being searched (under torchrun, "
        "cuda means cuda:LOCAL_RANK; the ranks split the calibration batches)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing --dst once the new one is complete")
    q.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    _add_quant_args(q)
    _add_calib_args(q)
    _add_search_args(q)
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="greedy generation with a quantized folder")
    g.add_argument("path")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=False, help="wrap the prompt in the chat template"
    )
    g.add_argument("--backend", default="auto", help="kernel backend (default %(default)s)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="SmolLM2-135M-Instruct from PyPI: RTN vs AWQ before/after table")
    d.add_argument("--work", default=None, help="folder for the outputs (default: the awqkit cache)")
    d.add_argument("--n-samples", type=int, default=16, help="self-generated calibration blocks (default %(default)s)")
    d.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 tokens (default %(default)s)")
    d.add_argument("--group-size", type=int, default=64, help="group size (default %(default)s)")
    d.set_defaults(func=cmd_demo)

    from awqkit.commands import batch_cmd, bench_cmd, calib_cmd, eval_cmd, info_cmd, lm_eval_cmd, orchestrate_cmd

    eval_cmd.register(sub)
    lm_eval_cmd.register(sub)
    bench_cmd.register(sub)
    batch_cmd.register(sub)
    orchestrate_cmd.register(sub)
    calib_cmd.register(sub)
    info_cmd.register(sub)
    return parser


#: Expected failures: printed as one line (exit 2); anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (AwqkitError, ValueError, OSError, ModuleNotFoundError)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM (a job scheduler, ``kill``) ends a run like Ctrl-C: unfinished outputs are removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, AwqkitError):
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    if isinstance(exc, KeyError):  # str(KeyError) is the quoted key only
        text = f"missing key {text}"
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``awqkit`` command; returns its exit status (0, 1 for partial failures, 2 errors, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        return int(args.func(args))
    except EXPECTED_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"awqkit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print(
            f"awqkit {args.command}: interrupted; unfinished outputs were removed, finished ones kept. Run the "
            "same command again to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
