"""Loading source models, saving and loading quantized checkpoints."""
