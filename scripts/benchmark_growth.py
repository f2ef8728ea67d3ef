"""Benchmark how awqkit's quantization cost grows with model size (issue 13 §5, "growth with size").

Random-weight Llama models are written to disk in bf16 safetensors, layer by layer (one shard per decoder layer,
one for the embeddings, one for the final norm and LM head, plus ``model.safetensors.index.json``; the whole model
is never in memory), seeded, with SmolLM2's tokenizer files (vocab 49152). Shapes (``--shapes``):

    1b    Llama-3.2-1B   hidden 2048, intermediate 8192,  32 heads / 8 kv heads, head_dim 64,  16 layers, tied
    8b    Llama-3-8B     hidden 4096, intermediate 14336, 32 heads / 8 kv heads, head_dim 128, 32 layers
    70b   Llama-3-70B    hidden 8192, intermediate 28672, 64 heads / 8 kv heads, head_dim 128, one layer only
    debug a narrow test shape: hidden 512, intermediate 1536, 8 heads / 2 kv heads, head_dim 64, 16 layers

at the depths of ``--depths`` (capped at the shape's layers; ``--full`` adds its full depth; 70b is always one
layer). Each model is quantized by ``awqkit quantize`` (AWQ, w4, ``--group-size``) in its own process with a small
fixed calibration (``--n-samples`` x ``--seq-len`` tokens of a text file, SQuAD 2.0 dev contexts by default; with
random weights the content does not matter). Recorded per model: wall time, seconds per decoder layer (the mean of
``layer_seconds`` in quantization_metadata.json, else search time / layers, else wall time / layers), the time
outside the layers (load, calibration, pack, save) and peak RSS (VmHWM of the child at its end).

Reported: per-layer time against width, peak RSS against depth (goal: 16 layers <= 1.15x the peak RSS of 4 layers),
the extrapolated time of a full 8B (32 layers) and 70B (80 layers) model here (seconds per layer x layers; load and
save not included), and whether the 8B shape stays within 4 GB peak RSS (goal; measured at the deepest 8b depth run).
Free disk space is checked before anything is written. Models and outputs are deleted after each measurement
unless ``--keep``; results are saved per model in ``--work`` so an interrupted benchmark resumes model by model.

Usage: python scripts/benchmark_growth.py [--shapes 1b,8b,70b] [--depths 2,4,8,16] [--full] [--n-samples 4]
       [--seq-len 128] [--keep] [--benchmarks FILE] [--from-json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (
    RunStore,
    add_output_args,
    awqkit_quantize,
    machine,
    machine_line,
    met,
    setup_logging,
    squad_contexts,
    write_section,
)

logger = logging.getLogger("bench.growth")
SECTION = "Engine: growth with model size, random-weight Llama shapes (issue 13)"
VOCAB = 49152  # SmolLM2's tokenizer
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden": 2048,
        "inter": 8192,
        "heads": 32,
        "kv": 8,
        "head_dim": 64,
        "layers": 16,
        "tied": True,
        "name": "Llama-3.2-1B",
    },
    "8b": {
        "hidden": 4096,
        "inter": 14336,
        "heads": 32,
        "kv": 8,
        "head_dim": 128,
        "layers": 32,
        "tied": False,
        "name": "Llama-3-8B",
    },
    "70b": {
        "hidden": 8192,
        "inter": 28672,
        "heads": 64,
        "kv": 8,
        "head_dim": 128,
        "layers": 80,
        "tied": False,
        "name": "Llama-3-70B",
        "depths": [1],
    },
    "debug": {
        "hidden": 512,
        "inter": 1536,
        "heads": 8,
        "kv": 2,
        "head_dim": 64,
        "layers": 16,
        "tied": False,
        "name": "debug",
    },
}


def layer_shapes(s: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, q, kv = s["hidden"], s["inter"], s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def model_bytes(s: dict[str, Any], depth: int) -> int:
    """bf16 bytes on disk: the layers, the embeddings, the final norm and (untied) the LM head."""
    per_layer = sum(_numel(shape) for shape in layer_shapes(s).values())
    return 2 * (depth * per_layer + VOCAB * s["hidden"] * (1 if s["tied"] else 2) + s["hidden"])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_random_llama(folder: Path, s: dict[str, Any], depth: int, seed: int, tokenizer_dir: Path) -> None:
    """A seeded random Llama of shape ``s`` with ``depth`` layers, one safetensors shard per part (never whole)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():  # written last: the folder is complete
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=depth,
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        head_dim=s["head_dim"],
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
        tie_word_embeddings=s["tied"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="bfloat16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    gen = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)  # RMSNorm weights
        return torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)

    parts: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (VOCAB, s["hidden"])}]
    parts += [{f"model.layers.{i}.{k}": v for k, v in layer_shapes(s).items()} for i in range(depth)]
    head = {} if s["tied"] else {"lm_head.weight": (VOCAB, s["hidden"])}
    parts.append({"model.norm.weight": (s["hidden"],), **head})
    weight_map, total = {}, 0
    for j, part in enumerate(parts, start=1):
        fname = f"model-{j:05d}-of-{len(parts):05d}.safetensors"
        tensors = {k: rand(v) for k, v in part.items()}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def check_disk(work: Path, plan: list[tuple[str, int]], keep: bool) -> None:
    """Refuse (exit 2) unless the models and their outputs fit in the free space of ``work``."""
    need_each = [int(model_bytes(SHAPES[sh], d) * 1.45) + (1 << 30) for sh, d in plan]  # model + int4 output + 1 GiB
    need = sum(need_each) if keep else max(need_each)
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(
            f"benchmark_growth: not enough disk space in {work}: the models "
            f"({', '.join(f'{sh}x{d}' for sh, d in plan)}) and their outputs need about "
            f"{need / 1e9:.1f} GB "
            f"{'in all (--keep)' if keep else 'at a time'}, {free / 1e9:.1f} GB is free. Free some space, "
            "point --work at a larger disk, or pick fewer/smaller --shapes/--depths."
        )
    logger.info("disk: about %.1f GB needed, %.1f GB free in %s", need / 1e9, free / 1e9, work)


def measure(key: str, sh: str, depth: int, a: argparse.Namespace, work: Path, calib: Path, tok_dir: Path) -> dict:
    s = SHAPES[sh]
    src, dst, logs = work / "models" / key, work / "out" / key, work / "logs"
    logger.info(
        "%s: writing a random %s-shaped model with %d layer(s) (%.1f GB bf16) ...",
        key,
        s["name"],
        depth,
        model_bytes(s, depth) / 1e9,
    )
    write_random_llama(src, s, depth, a.seed, tok_dir)
    logger.info("%s: quantizing ...", key)
    args = [
        "--method",
        "awq",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--overwrite",
        "--bits",
        "4",
        "--group-size",
        str(a.group_size),
        "--calib",
        str(calib),
        "--n-samples",
        str(a.n_samples),
        "--seq-len",
        str(a.seq_len),
        *a.awqkit_arg,
    ]
    r = awqkit_quantize(args, logs / f"{key}.result.json", logs / f"{key}.log")
    meta = r.pop("metadata") or {}
    t = meta.get("timings_seconds", {})
    layer_s = (meta.get("awq") or {}).get("layer_seconds") or []
    searched = t.get("layers", t.get("search"))  # the engine's name for the layer loop's total
    if layer_s:
        per_layer, how, in_layers = statistics.median(layer_s), "median of layer_seconds", sum(layer_s)
    elif searched:
        per_layer, how, in_layers = searched / depth, "search time / layers", searched
    else:
        per_layer, how, in_layers = r["seconds"] / depth, "wall time / layers", r["seconds"]
    rec = {
        "shape": sh,
        "depth": depth,
        "disk_bytes": model_bytes(s, depth),
        "seconds": r["seconds"],
        "peak_rss": r["peak_rss"],
        "s_per_layer": per_layer,
        "per_layer_from": how,
        "layer_seconds": layer_s,
        "outside_layers_s": r["seconds"] - in_layers,
        "timings": t,
        "versions": meta.get("versions", {}),
    }
    if not a.keep:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    logger.info("%s: %.0f s, %.1f s/layer, peak RSS %.2f GB", key, r["seconds"], per_layer, r["peak_rss"] / 1e9)
    return rec


def render(recs: dict[str, dict], a: argparse.Namespace, mach: dict[str, Any], command: str) -> str:
    from awqkit.report.table import markdown_table

    rows = [
        {
            "shape": SHAPES[r["shape"]]["name"],
            "hidden / inter": f"{SHAPES[r['shape']]['hidden']} / {SHAPES[r['shape']]['inter']}",
            "layers": r["depth"],
            "bf16 GB": r["disk_bytes"] / 1e9,
            "quantize s": r["seconds"],
            "s / layer": r["s_per_layer"],
            "outside layers s": r["outside_layers_s"],
            "peak RSS GB": r["peak_rss"] / 1e9,
        }
        for r in recs.values()
    ]
    table = markdown_table(
        rows,
        floatfmt={
            "bf16 GB": ".2f",
            "quantize s": ".0f",
            "s / layer": ".1f",
            "outside layers s": ".0f",
            "peak RSS GB": ".2f",
        },
    )
    by_shape: dict[str, dict[int, dict]] = {}
    for r in recs.values():
        by_shape.setdefault(r["shape"], {})[r["depth"]] = r
    lines = []
    for sh, d in by_shape.items():
        deepest = d[max(d)]
        full = SHAPES[sh]["layers"]
        lines.append(
            f"- {SHAPES[sh]['name']} (hidden {SHAPES[sh]['hidden']}): {deepest['s_per_layer']:.1f} s per "
            f"layer at {max(d)} layer(s) -> a full {full}-layer model about "
            f"{deepest['s_per_layer'] * full / 3600:.2f} h here (layers only)"
        )
        if 4 in d and max(d) > 4:
            ratio = deepest["peak_rss"] / d[4]["peak_rss"]
            goal = f"**{met(ratio <= 1.15)}**" if max(d) >= 16 else f"{met(ratio <= 1.15)} (goal is stated at 16)"
            lines.append(f"  - peak RSS {max(d)} layers / 4 layers = {ratio:.2f}x (goal <= 1.15x): {goal}")
        if sh == "8b":
            ok = deepest["peak_rss"] <= 4e9
            lines.append(
                f"  - peak RSS {deepest['peak_rss'] / 1e9:.2f} GB at {max(d)} of 32 layers (goal: a full "
                f"8B within 4 GB): **{met(ok)}**" + ("" if max(d) == 32 else " at this depth")
            )
    versions = next((r["versions"] for r in recs.values() if r.get("versions")), {})
    return (
        f"Random-weight Llama models in bf16 safetensors (one shard per layer, seed {a.seed}, vocab {VOCAB}), "
        f"quantized by `awqkit quantize` (AWQ, w4 g{a.group_size}) with {a.n_samples} x {a.seq_len} calibration "
        "tokens of SQuAD 2.0 dev contexts, each model in its own process. s / layer: the median of the engine's "
        "per-layer times (quantization_metadata.json; the median, so that one slow layer on a shared machine does "
        "not skew the extrapolation), or search time / layers where not recorded; outside layers: wall time minus "
        "the sum of the layers (load, calibration, pack, save); peak RSS: VmHWM of the process."
        + (f" awqkit options: `{' '.join(a.awqkit_arg)}`." if a.awqkit_arg else "")
        + f"\n\nMachine: {machine_line(mach)}. Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}."
        f"\n\nProduced by `{command}`.\n\n{table}\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1b,8b,70b", help="comma-separated, of: " + ", ".join(SHAPES))
    ap.add_argument("--depths", default="2,4,8,16", help="layer counts for 1b/8b/debug (default %(default)s)")
    ap.add_argument("--full", action="store_true", help="also each shape's full depth (1b: 16, 8b: 32 layers)")
    ap.add_argument("--n-samples", type=int, default=4, help="calibration blocks (default %(default)s)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per calibration block (default %(default)s)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="weights' seed (default %(default)s)")
    ap.add_argument("--calib", default=None, help="calibration text file (default: SQuAD 2.0 dev contexts)")
    ap.add_argument(
        "--awqkit-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `awqkit quantize` argument (repeatable), e.g. --awqkit-arg=--rank-top-k=0",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated models and outputs (default: delete)")
    add_output_args(ap, "~/.cache/awqkit/bench-growth", SECTION)
    a = ap.parse_args()
    setup_logging(a.verbose)
    shapes = a.shapes.split(",")
    if set(shapes) - set(SHAPES):
        ap.error(f"unknown shapes {sorted(set(shapes) - set(SHAPES))}; choose from {list(SHAPES)}")
    depths = sorted({int(x) for x in a.depths.split(",")})
    plan = []
    for sh in shapes:
        s = SHAPES[sh]
        ds = s.get("depths") or sorted({d for d in depths if d <= s["layers"]} | ({s["layers"]} if a.full else set()))
        plan += [(sh, d) for d in ds]

    from awqkit.eval.perplexity import default_data_dir
    from awqkit.zoo import fetch_smollm2

    work = Path(a.work).expanduser()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    settings = {
        "n_samples": a.n_samples,
        "seq_len": a.seq_len,
        "group_size": a.group_size,
        "seed": a.seed,
        "calib": a.calib,
        "awqkit_arg": a.awqkit_arg,
    }
    store = RunStore(work, settings)
    recs: dict[str, dict] = {}
    todo = [(sh, d) for sh, d in plan if a.rerun or store.get(f"{sh}-d{d}") is None]
    if a.from_json:
        todo = []
    elif todo:
        check_disk(work, todo, a.keep)
    calib = Path(a.calib) if a.calib else work / "calib-squad-contexts.txt"
    if not a.calib and todo:
        data = Path(a.data_dir) if a.data_dir else default_data_dir()
        calib.write_text("\n".join(squad_contexts(data)) + "\n", encoding="utf-8")
    tok_dir = fetch_smollm2() if todo else None
    for sh, d in plan:
        key = f"{sh}-d{d}"
        rec = None if (a.rerun and (sh, d) in todo) else store.get(key)
        if rec is None and not a.from_json:
            rec = store.put(key, measure(key, sh, d, a, work, calib, tok_dir))
        if rec is not None:
            recs[key] = rec
    if not recs:
        raise SystemExit("nothing to report")
    mach_file = work / "machine.json"
    mach = json.loads(mach_file.read_text()) if a.from_json and mach_file.is_file() else machine()
    mach_file.write_text(json.dumps(mach))
    command = subprocess.list2cmdline(
        ["python", "scripts/benchmark_growth.py", "--shapes", ",".join(shapes), "--depths", a.depths]
        + (["--full"] if a.full else [])
        + ["--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len)]
        + ([f"--group-size={a.group_size}"] if a.group_size != 128 else [])
        + [f"--awqkit-arg={x}" for x in a.awqkit_arg]
    )
    body = render(recs, a, mach, command) + (f"\n{a.note}\n" if a.note else "")
    print(body)
    if not a.no_write:
        write_section(Path(a.benchmarks), a.section, body)


if __name__ == "__main__":
    main()
