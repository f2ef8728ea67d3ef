"""awqkit's own decode loop (:class:`~awqkit.runtime.decoder.Decoder`) and its fused linear ops."""

from awqkit.runtime.decoder import Decoder, supported

__all__ = ["Decoder", "supported"]
