"""Evaluation: WikiText-2 perplexity, KL divergence against a baseline, and resource measurements."""

from awqkit.eval.perplexity import (
    default_data_dir,
    kl_divergence,
    load_wikitext_test,
    make_windows,
    perplexity,
)
from awqkit.eval.resources import (
    PeakRSSTracker,
    Timer,
    current_rss_bytes,
    folder_size_bytes,
    fp16_size_bytes,
    peak_rss_bytes,
    track_peak_rss,
)

__all__ = [
    "PeakRSSTracker",
    "Timer",
    "current_rss_bytes",
    "default_data_dir",
    "folder_size_bytes",
    "fp16_size_bytes",
    "kl_divergence",
    "load_wikitext_test",
    "make_windows",
    "peak_rss_bytes",
    "perplexity",
    "track_peak_rss",
]
