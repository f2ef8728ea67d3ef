"""Quantization math (pure tensor functions) and the packed on-disk layouts."""
