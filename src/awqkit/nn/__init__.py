"""The quantized linear module and module replacement."""
