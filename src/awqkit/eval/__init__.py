"""Quality: WikiText-2 perplexity, KL divergence against a baseline, tasks (ARC, SQuAD, GSM8K), the eval runner.
Speed and memory live in :mod:`awqkit.bench`."""

from awqkit.eval.perplexity import (
    default_data_dir,
    kl_divergence,
    load_text_file,
    load_wikitext_test,
    make_windows,
    perplexity,
)

__all__ = [
    "default_data_dir",
    "kl_divergence",
    "load_text_file",
    "load_wikitext_test",
    "make_windows",
    "perplexity",
]
