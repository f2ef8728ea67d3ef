"""Downstream task evaluation: ARC-Challenge (log-likelihood multiple choice), SQuAD 2.0 and GSM8K (greedy
generation). Every ``evaluate_<task>(model, tokenizer, *, path=None, limit=None, batch_size=..., progress=True,
...)`` returns a dict with the task's metrics, the number of items ``n`` and the ``sha256`` of the data file.
"""

from awqkit.eval.tasks.arc import evaluate_arc, loglikelihood
from awqkit.eval.tasks.gsm8k import evaluate_gsm8k, extract_answer
from awqkit.eval.tasks.squad import compute_exact, compute_f1, evaluate_squad, normalize_answer

__all__ = [
    "compute_exact",
    "compute_f1",
    "evaluate_arc",
    "evaluate_gsm8k",
    "evaluate_squad",
    "extract_answer",
    "loglikelihood",
    "normalize_answer",
]
