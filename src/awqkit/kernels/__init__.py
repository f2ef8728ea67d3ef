"""Registry of matmul backends for :class:`awqkit.nn.qlinear.QuantLinear`.

A backend is ``fn(x, module) -> y``: ``x`` is ``[..., in_features]`` of any float dtype, ``module`` a
``QuantLinear`` (packed buffers, ``bits``, ``group_size``...), ``y`` is ``[..., out_features]`` in
``x.dtype``. ``available()`` says whether the backend can run in this process at all (library
installed, device present); the optional ``supports(x, module)`` says whether it handles this
particular call (group size, shapes, device). ``"auto"`` picks the available backend with the highest
priority that supports the call; the pure-PyTorch ``torch`` backend (priority 0) supports everything
and is the oracle the others are tested against. Backends must not cache across calls unless asked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)

BackendFn = Callable[[Tensor, "QuantLinear"], Tensor]
SupportsFn = Callable[[Tensor, "QuantLinear"], bool]


@dataclass(frozen=True)
class Backend:
    """One registered backend (see the module docstring)."""

    name: str
    fn: BackendFn
    available: Callable[[], bool]
    priority: int = 0
    supports: SupportsFn | None = None

    def is_available(self) -> bool:
        try:
            return bool(self.available())
        except Exception as exc:  # a probe that crashes means "not available", but say why
            logger.debug("backend %r availability probe failed: %s", self.name, exc)
            return False

    def handles(self, x: Tensor, module: QuantLinear) -> bool:
        return self.supports is None or bool(self.supports(x, module))


_REGISTRY: dict[str, Backend] = {}
_ORDERED: list[Backend] = []  # _REGISTRY by priority, highest first; rebuilt on (un)registration


def _reorder() -> None:
    _ORDERED[:] = sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def register_backend(
    name: str,
    fn: BackendFn,
    available: Callable[[], bool],
    *,
    priority: int = 0,
    supports: SupportsFn | None = None,
    replace: bool = False,
) -> Backend:
    """Register backend ``name``; ``replace=True`` overrides an existing registration."""
    if not name or name == "auto":
        raise ValueError(f"backend name {name!r} is reserved or empty; choose another name")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered; pass replace=True to override it")
    backend = Backend(name=name, fn=fn, available=available, priority=priority, supports=supports)
    _REGISTRY[name] = backend
    _reorder()
    return backend


def unregister_backend(name: str) -> None:
    """Remove backend ``name`` (tests, plugins); the built-in ``torch`` backend cannot be removed."""
    if name == "torch":
        raise ValueError("the 'torch' reference backend cannot be unregistered")
    if _REGISTRY.pop(name, None) is None:
        raise ValueError(f"backend {name!r} is not registered (registered: {list_backends()})")
    _reorder()


def list_backends(only_available: bool = False) -> list[str]:
    """Registered backend names, highest priority first."""
    return [b.name for b in _ORDERED if not only_available or b.is_available()]


def get_backend(name: str = "auto") -> Backend:
    """The backend called ``name`` (must be available), or for ``"auto"`` the best available one."""
    if name == "auto":
        for backend_name in list_backends(only_available=True):
            return _REGISTRY[backend_name]
        raise RuntimeError(f"no kernel backend is available (registered: {list_backends()})")
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown kernel backend {name!r}; available: {list_backends(only_available=True)} "
            f"(registered: {list_backends()}), or 'auto'"
        )
    backend = _REGISTRY[name]
    if not backend.is_available():
        raise ValueError(
            f"kernel backend {name!r} is registered but not available here; "
            f"available: {list_backends(only_available=True)}, or use 'auto'"
        )
    return backend


def resolve_backend(name: str, x: Tensor, module: QuantLinear) -> Backend:
    """The backend to run ``module`` on ``x``: ``name`` itself (it must support the call) or the
    highest-priority available backend that supports it when ``name == "auto"``."""
    if name != "auto":
        backend = get_backend(name)
        if not backend.handles(x, module):
            raise ValueError(
                f"kernel backend {name!r} does not support this call (bits={module.bits}, "
                f"group_size={module.group_size}, shape [{module.out_features}, {module.in_features}], "
                f"x {x.dtype} on {x.device}); use backend='auto' or 'torch'"
            )
        return backend
    for backend in _ORDERED:  # runs on every forward: no list building
        if backend.handles(x, module) and backend.is_available():  # supports() first: cheap and decisive
            return backend
    raise RuntimeError(
        f"no available kernel backend supports bits={module.bits}, group_size={module.group_size} "
        f"on {x.device} (available: {list_backends(only_available=True)})"
    )


def _register_builtin() -> None:
    from awqkit.kernels import cpu_avx2, cpu_int4, torch_ref

    register_backend("torch", torch_ref.forward, lambda: True, priority=0, replace=True)
    register_backend(
        cpu_int4.NAME,
        cpu_int4.forward,
        cpu_int4.is_available,
        priority=cpu_int4.PRIORITY,
        supports=cpu_int4.supports,
        replace=True,
    )
    register_backend(
        cpu_avx2.NAME,
        cpu_avx2.forward,
        cpu_avx2.is_available,
        priority=cpu_avx2.PRIORITY,
        supports=cpu_avx2.supports,
        replace=True,
    )
    try:  # optional: the module imports without triton (is_available() is then False), but never fail here
        from awqkit.kernels import triton_w4a16
    except Exception as exc:  # pragma: no cover - a broken triton install must not break `import awqkit`
        logger.debug("triton backend not registered: %s", exc)
    else:
        register_backend(
            triton_w4a16.NAME,
            triton_w4a16.forward,
            triton_w4a16.is_available,
            priority=triton_w4a16.PRIORITY,
            supports=triton_w4a16.supports,
            replace=True,
        )


_register_builtin()

__all__ = ["Backend", "register_backend", "unregister_backend", "get_backend", "resolve_backend", "list_backends"]
