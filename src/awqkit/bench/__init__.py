"""Speed and memory: timing modes of a checkpoint (prefill, decode, RSS, weight bytes), llama.cpp as a reference,
resource measurements, and their tables. Quality metrics live in :mod:`awqkit.eval`."""
