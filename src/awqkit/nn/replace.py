"""Swap the linears at full dotted names for :class:`QuantLinear`. Names and name patterns live in
:mod:`awqkit.arch.names` (re-exported here)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from awqkit.arch.names import get_module, match_names, name_matches, set_module
from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)


def replace_linears(
    model: nn.Module,
    names: Sequence[str],
    bits: int | Mapping[str, int],
    group_size: int,
    zero_point: bool = True,
    integers: Mapping[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    *,
    format: str | None = None,
) -> dict[str, QuantLinear]:
    """Quantize and swap the ``nn.Linear`` modules at the exact full ``names`` for :class:`QuantLinear`.

    ``bits``: one width, or each name's width (mixed bits; every name must be there). ``format``: the
    QuantLinear layout (``"gemm"`` or ``"pack-quantized"``; None: gemm at 4 bits, pack-quantized otherwise).
    ``integers`` maps some of the names to the ``(q, scales, zeros)`` a rounding method chose; those are packed as
    given (:meth:`QuantLinear.from_linear`). Every name is validated before anything is replaced, so a bad name
    leaves the model untouched. Returns ``{name: QuantLinear}`` in the order given.
    """
    if isinstance(names, str):
        raise ValueError(f"names must be a sequence of full module names, not the string {names!r}")
    linears: dict[str, nn.Linear] = {}
    for name in names:
        module = get_module(model, name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}, not an nn.Linear; only linears can be quantized"
            )
        linears[name] = module
        if not isinstance(bits, int) and name not in bits:
            raise ValueError(f"bits gives no width for {name!r}; pass an int or a width for every name")
    replaced: dict[str, QuantLinear] = {}
    for name, linear in linears.items():
        given = integers.get(name) if integers else None
        width = bits if isinstance(bits, int) else bits[name]
        qlinear = QuantLinear.from_linear(linear, width, group_size, zero_point, format=format, integers=given)
        set_module(model, name, qlinear)
        replaced[name] = qlinear
    widths = sorted({q.bits for q in replaced.values()})
    logger.debug("replaced %d linears with %s-bit QuantLinear (group_size=%d)", len(replaced), widths, group_size)
    return replaced


__all__ = ["get_module", "match_names", "name_matches", "replace_linears", "set_module"]
