"""WikiText-2 perplexity and KL divergence against a baseline model.

Protocol (GPTQ / AWQ style):

* The test split's non-empty rows are joined with ``"\\n\\n"`` (:func:`load_wikitext_test`); a user's own
  text file is scored as it is, unchanged (:func:`load_text_file`).
* The whole text is tokenized once without special tokens and cut into consecutive, non-overlapping
  windows of ``seq_len`` tokens (stride = ``seq_len``); a trailing partial window is dropped
  (:func:`make_windows`).
* Each window is scored on its own: position ``t`` predicts token ``t + 1``, so a window of ``L``
  tokens contributes ``L - 1`` predictions (tokens ``1..L-1``). Perplexity is
  ``exp(total NLL / total predicted tokens)`` (:func:`perplexity`).

Logits are cast to float32 before ``log_softmax`` and every sum is accumulated in float64. The
``log_softmax`` runs over chunks of positions so that a large vocabulary never needs a second
full-size ``[batch, seq, vocab]`` float32 buffer beside the logits the model returns.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from awqkit.errors import InputError

logger = logging.getLogger(__name__)

#: Environment variable that overrides :func:`default_data_dir`.
DATA_ENV_VAR = "AWQKIT_DATA"
#: Location of the WikiText-2 raw test split inside the data folder.
WIKITEXT_TEST_RELPATH = Path("wikitext-2-raw") / "wiki.test.raw"
#: Upper bound on ``positions x vocab`` elements handled by one ``log_softmax`` chunk.
_CHUNK_ELEMENTS = 1 << 24


def _exp(nll: float) -> float:
    """``exp(nll)``, Inf where it overflows (a broken model's huge NLL is a result, reported as non-finite)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def _find_repo_root(start: Path) -> Path | None:
    """First folder at or above ``start`` holding the awqkit ``pyproject.toml``."""
    for folder in (start, *start.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                content = pyproject.read_text(encoding="utf-8")
            except OSError:
                continue
            if 'name = "awqkit"' in content:
                return folder
    return None


def default_data_dir() -> Path:
    """Folder holding the shared evaluation data sets.

    ``$AWQKIT_DATA`` when set; otherwise ``<repo root>/../shared/data``, where the repo root is the
    first folder above this source file that holds awqkit's ``pyproject.toml``; if there is none
    (e.g. a non-editable install), ``../shared/data`` relative to the current working directory.
    The folder is not checked for existence here.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    root = _find_repo_root(Path(__file__).resolve().parent)
    if root is not None:
        return (root.parent / "shared" / "data").resolve()
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def load_wikitext_test(path: Path | str | None = None) -> str:
    """WikiText-2 raw test split as one string: its non-empty rows joined with ``"\\n\\n"``.

    Args:
        path: the ``wiki.test.raw`` file, or a data folder holding ``wikitext-2-raw/wiki.test.raw``
            (or ``wiki.test.raw`` directly); ``None`` uses :func:`default_data_dir`.
    Raises:
        FileNotFoundError: naming the path that was looked for.
        ValueError: if the file holds no text.
    """
    p = Path(path).expanduser() if path is not None else default_data_dir()
    if p.is_dir():
        candidates = [p / WIKITEXT_TEST_RELPATH, p / WIKITEXT_TEST_RELPATH.name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"WikiText-2 test file not found in data folder {p} (looked for "
                f"{candidates[0]} and {candidates[1]}); pass its path or set ${DATA_ENV_VAR}"
            )
        p = found
    elif not p.is_file():
        raise FileNotFoundError(f"WikiText-2 test file not found: {p}; pass its path or set ${DATA_ENV_VAR}")
    # newline="" keeps "\r\n" as is so the split below sees the rows exactly.
    with open(p, encoding="utf-8-sig", newline="") as fh:
        raw = fh.read()
    rows = [line for line in raw.replace("\r\n", "\n").split("\n") if line]
    if not rows:
        raise ValueError(f"WikiText-2 test file {p} holds no text")
    logger.debug("loaded %d rows from %s", len(rows), p)
    return "\n\n".join(rows)


def text_file_path(path: Path | str) -> Path:
    """``path`` (``~`` expanded), checked to name an existing file, for :func:`load_text_file`.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message starts ``perplexity text file not found``).
        InputError (a ValueError): ``path`` is a folder.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(
            f"perplexity text file {p} is a folder; pass a text file (for WikiText-2 test in a data folder "
            "leave out --text and pass the folder as --data-dir)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"perplexity text file not found: {p}; pass the path of an existing UTF-8 text file")
    return p


def load_text_file(path: Path | str) -> str:
    """A user's text file for perplexity, exactly as it is: the file decoded as UTF-8 with nothing changed.

    Every line, blank line, leading space and line ending (``"\\r\\n"`` included) and a byte-order mark are
    kept: the text is not joined the way :func:`load_wikitext_test` joins WikiText, so a file's perplexity is
    that of its raw text.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message starts ``perplexity text file not found``).
        InputError (a ValueError): ``path`` is a folder, the file is not UTF-8, or it holds no text (only
            whitespace or nothing); the message names the file and the fix.
    """
    p = text_file_path(path)
    try:
        # newline="" keeps "\r\n" and lone "\r" as they are in the file.
        with open(p, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise InputError(
            f"perplexity text file {p} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
            "convert it to UTF-8 (e.g. `iconv -f <its encoding> -t utf-8`)"
        ) from None
    if not text.strip():
        raise InputError(f"perplexity text file {p} is empty (no text to score); pass a file that holds text")
    logger.debug("read %d characters from %s as they are", len(text), p)
    return text


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (silencing the max-length warning if possible)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:
        enc = tokenizer(text, add_special_tokens=False)
    if hasattr(enc, "keys"):
        ids = enc["input_ids"]
    elif hasattr(enc, "input_ids"):
        ids = enc.input_ids
    else:
        ids = enc
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
    elif ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"tokenizer returned {len(ids)} sequences for one text")
        ids = list(ids[0])
    return list(ids)


def make_windows(tokenizer: Any, text: str, seq_len: int = 2048, n_windows: int | None = None) -> Tensor:
    """Tokenize ``text`` once and cut it into consecutive non-overlapping windows.

    Window ``i`` holds tokens ``[i * seq_len, (i + 1) * seq_len)`` (stride = ``seq_len``, no overlap,
    so every token is predicted at most once and the first token of each window has no context).
    A trailing partial window is dropped.

    Args:
        tokenizer: callable like a Hugging Face tokenizer returning ``input_ids``.
        text: the text, e.g. from :func:`load_wikitext_test` or :func:`load_text_file`.
        seq_len: tokens per window (at least 2).
        n_windows: keep the first ``n_windows`` windows; ``None`` keeps all complete windows.
    Returns:
        int64 tensor ``[n, seq_len]``.
    Raises:
        ValueError: bad arguments, fewer tokens than one window, or fewer windows than requested.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be positive or None, got {n_windows}")
    ids = _token_ids(tokenizer, text)
    available = len(ids) // seq_len
    if available < 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    if n_windows is not None and n_windows > available:
        raise ValueError(
            f"asked for {n_windows} windows of {seq_len} tokens but the text has only "
            f"{len(ids)} tokens ({available} complete windows)"
        )
    n = available if n_windows is None else n_windows
    logger.info("%d tokens -> %d windows of %d tokens", len(ids), n, seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _check_windows(windows: Tensor, batch_size: int) -> None:
    if not isinstance(windows, Tensor) or windows.dim() != 2:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a 2-D tensor [n, seq_len], got {shape}")
    if windows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"windows must hold integer token ids, got {windows.dtype}")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must have at least one row of at least 2 tokens, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``[B, L, V]`` logits of a causal LM (no KV cache)."""
    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(input_ids.shape)}")
    return logits


def _chunks(logits: Tensor) -> Iterator[tuple[int, int, int]]:
    """``(row, start, end)`` spans over the predicting positions ``0..L-2`` of every row."""
    n_rows, length, vocab = logits.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    for b in range(n_rows):
        for s in range(0, length - 1, step):
            yield b, s, min(s + step, length - 1)


class _EvalMode:
    """Puts modules in eval mode and restores their previous training flags on exit."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.flags: list[bool] = []

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in zip(self.modules, self.flags, strict=True):
            m.train(flag)


def _batches(windows: Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[Tensor]:
    starts = range(0, windows.shape[0], batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        yield windows[s : s + batch_size]


def perplexity(
    model: nn.Module,
    windows: Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity of a causal LM on token windows.

    Each window is scored independently: positions ``0..L-2`` predict tokens ``1..L-1``.
    The model must already sit on ``device``; only the inputs are moved.

    Returns:
        ``ppl`` = ``exp(nll_sum / n_tokens)``, ``nll_sum`` (float64 sum of negative log-probs),
        ``n_tokens`` (predicted tokens), ``n_windows`` and ``seq_len``.
    """
    _check_windows(windows, batch_size)
    nll_sum = 0.0
    n_tokens = 0
    with torch.inference_mode(), _EvalMode(model):
        for batch in _batches(windows, batch_size, progress, "perplexity"):
            ids = batch.to(device=device, dtype=torch.long)
            logits = _logits(model, ids)
            for b, s, e in _chunks(logits):
                logp = torch.log_softmax(logits[b, s:e].float(), dim=-1)
                target = ids[b, s + 1 : e + 1].unsqueeze(-1)
                nll_sum -= logp.gather(-1, target).sum(dtype=torch.float64).item()
                n_tokens += e - s
            del logits
    return {
        "ppl": _exp(nll_sum / n_tokens),
        "nll_sum": nll_sum,
        "n_tokens": n_tokens,
        "n_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
    }


def kl_divergence(
    model: nn.Module,
    baseline: nn.Module,
    windows: Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float | int]:
    """KL divergence of ``model`` from ``baseline``, top-1 agreement and both perplexities in one pass.

    Direction: ``KL(P_baseline || P_model) = sum_v P_baseline(v) * (log P_baseline(v) - log P_model(v))``
    per predicting position, i.e. the baseline is the reference distribution (as in llama.cpp's
    ``--kl-divergence``). Positions are those :func:`perplexity` scores (``0..L-2`` of each window).
    Both models must already sit on ``device`` and share a vocabulary.

    Returns:
        ``kl`` (mean over positions), ``kl_sum``, ``top1_agreement`` (fraction of positions whose
        argmax tokens agree), ``ppl_model``, ``ppl_baseline``, ``nll_sum_model``,
        ``nll_sum_baseline``, ``n_tokens`` and ``n_windows``.
    """
    _check_windows(windows, batch_size)
    kl_sum = 0.0
    nll_m = 0.0
    nll_b = 0.0
    agree = 0
    n_tokens = 0
    with torch.inference_mode(), _EvalMode(model, baseline):
        for batch in _batches(windows, batch_size, progress, "kl-divergence"):
            ids = batch.to(device=device, dtype=torch.long)
            logits_b = _logits(baseline, ids)
            logits_m = _logits(model, ids)
            if logits_b.shape != logits_m.shape:
                raise ValueError(
                    f"model logits {tuple(logits_m.shape)} and baseline logits "
                    f"{tuple(logits_b.shape)} differ in shape (different vocabularies?)"
                )
            for b, s, e in _chunks(logits_m):
                lm = logits_m[b, s:e].float()
                lb = logits_b[b, s:e].float()
                logp_m = torch.log_softmax(lm, dim=-1)
                logp_b = torch.log_softmax(lb, dim=-1)
                target = ids[b, s + 1 : e + 1].unsqueeze(-1)
                nll_m -= logp_m.gather(-1, target).sum(dtype=torch.float64).item()
                nll_b -= logp_b.gather(-1, target).sum(dtype=torch.float64).item()
                logp_b64 = logp_b.double()
                kl = (logp_b64.exp() * (logp_b64 - logp_m.double())).sum()
                kl_sum += kl.item()
                agree += int((lm.argmax(-1) == lb.argmax(-1)).sum().item())
                n_tokens += e - s
            del logits_b, logits_m
    return {
        "kl": kl_sum / n_tokens,
        "kl_sum": kl_sum,
        "top1_agreement": agree / n_tokens,
        "ppl_model": _exp(nll_m / n_tokens),
        "ppl_baseline": _exp(nll_b / n_tokens),
        "nll_sum_model": nll_m,
        "nll_sum_baseline": nll_b,
        "n_tokens": n_tokens,
        "n_windows": int(windows.shape[0]),
    }
