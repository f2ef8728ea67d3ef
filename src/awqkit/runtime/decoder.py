"""awqkit's own decode loop for Llama-style models: a static KV cache and one lean step per token.

Why: at batch-1 decode on a CPU, the int4 GEMVs that read a small model's weights take a fraction of the
time the transformers eager forward spends around them (module hooks, a growing ``DynamicCache``,
attention-mask building, SDPA's set-up, ~25 small ops per layer; BENCHMARKS.md "Inference speed: where the
decode time goes" has the measured split). :class:`Decoder` runs the same
mathematics from the model's own modules and weights with far fewer calls per layer:

    x = input_norm(h);  qkv = [q | k | v](x)           (one fused int4 GEMV with cpu-avx2)
    h += o(attention(qkv, cache, pos))                  (rotary, cache write, GQA softmax: one native call)
    x = post_attn_norm(h);  h += down(silu(gate(x)) * up(x))   ([gate | up] one GEMV; residuals in-kernel)

and ``logits = head(final_norm(h))`` for the last position. When every linear is a fused cpu-avx2 op, a
decode step's whole layer stack is one native call (:mod:`awqkit.runtime.stack`, same kernels, same order,
bit-identical). Everything else (embedding, rotary tables,
the head, dense or other-backend linears) calls the model's modules, so what a checkpoint computes is
unchanged: logits equal the transformers forward's to fp32 rounding, greedy tokens are the same (tests).

Scope (checked at construction, with a clear error): an architecture whose :class:`awqkit.arch.DecodeSpec`
is set (Llama, Mistral, Qwen2, Qwen3), float32 weights on CPU (the engine computes in fp32, as awqkit does
on CPU), SiLU MLPs, rotary over the whole head. Sequences of one batch share their length (no padding).
Native pieces (``awqkit.kernels.decode_ops``) run where the native library loads; elsewhere the torch
reference ops do the same work (``native=False`` forces that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from awqkit.arch import REGISTRY, DecodeSpec, resolve_arch
from awqkit.arch.resolve import get_layers, get_submodule
from awqkit.kernels import decode_ops, native
from awqkit.kernels.cpu_avx2 import MAX_ROWS
from awqkit.kernels.decode_ops import AttentionShape
from awqkit.nn import hf
from awqkit.runtime import linear, stack
from awqkit.runtime.linear import FusedInt4, ModuleCalls

logger = logging.getLogger(__name__)

_F32 = torch.float32


@dataclass
class _Layer:
    in_norm: Tensor
    post_norm: Tensor
    eps: float
    qkv: FusedInt4 | ModuleCalls
    o: FusedInt4 | ModuleCalls
    gate_up: FusedInt4 | ModuleCalls
    down: FusedInt4 | ModuleCalls
    shape: AttentionShape
    q_norm: Tensor | None
    k_norm: Tensor | None


def decode_spec(model: nn.Module) -> DecodeSpec:
    """The model's :class:`DecodeSpec`, or a ValueError naming the families the decode loop runs."""
    spec = resolve_arch(model)
    if spec.decode is None:
        runs = [s.name for s in REGISTRY if s.decode is not None]
        raise ValueError(
            f"awqkit's decode loop does not run {spec.name} models (it runs {', '.join(runs)}); "
            "use the transformers loop (loop='transformers')"
        )
    return spec.decode


_FIX = "load with dtype=torch.float32 on CPU, or use the transformers loop"


def _norm_weight(module: nn.Module, where: str) -> tuple[Tensor, float]:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, Tensor) or weight.dim() != 1 or eps is None:
        raise ValueError(f"{where} ({type(module).__name__}) is not an RMSNorm with a weight and an eps")
    if weight.dtype != _F32:
        raise ValueError(f"awqkit's decode loop computes in float32, but {where} is {weight.dtype}; {_FIX}")
    return weight.detach(), float(eps)


def _check_float32_cpu(model: nn.Module) -> None:
    """Every tensor on CPU, every plain float layer in float32 (quantized and fp16-storage layers compute
    in their input's dtype, fp32 here)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_cpu:
            raise ValueError(f"awqkit's decode loop runs on CPU, but {name} is on {t.device}; {_FIX}")
    for name, m in model.named_modules():
        if type(m) in (nn.Linear, nn.Embedding) and m.weight.dtype != _F32:
            raise ValueError(f"awqkit's decode loop computes in float32, but {name} is {m.weight.dtype}; {_FIX}")


class Decoder:
    """Greedy/stepwise decoding of ``model`` with a static KV cache (see the module docstring).

    ``start(batch, max_len)`` allocates the caches; ``prefill(ids)`` runs a ``[B, T]`` prompt and returns the
    last position's logits ``[B, vocab]``; ``step(ids)`` one new token per sequence (``[B, 1]``);
    :meth:`generate` does all three greedily. ``native_ops``: None uses the native CPU ops where available,
    False the torch reference ops only. ``native_stack``: run a decode step's whole layer stack as one native
    call (:mod:`awqkit.runtime.stack`) when every layer allows it; the same numbers as the per-op path.
    Build the decoder after the weights are final: it keeps fused copies of the int4 layers.
    """

    def __init__(self, model: nn.Module, native_ops: bool | None = None, native_stack: bool = True) -> None:
        spec = decode_spec(model)
        _check_float32_cpu(model)
        cfg = hf.config(model)
        act = str(getattr(cfg, "hidden_act", "silu"))
        if act not in ("silu", "swish"):
            raise ValueError(f"awqkit's decode loop supports SiLU MLPs; this model uses {act!r}")
        if getattr(cfg, "final_logit_softcapping", None):
            raise ValueError("awqkit's decode loop does not apply logit soft-capping; use the transformers loop")
        self.model, self.spec = model, spec
        self.native = native_ops is not False and native.library() is not None
        if native_ops and not self.native:
            raise ValueError(f"native ops requested but unavailable: {native.unavailable_reason()}")
        self.embed = get_submodule(model, spec.embed)
        self.rotary = get_submodule(model, spec.rotary)
        self.final_norm, self.final_eps = _norm_weight(get_submodule(model, spec.final_norm), spec.final_norm)
        self.head = get_submodule(model, spec.head)
        heads, kv_heads = (
            int(cfg.num_attention_heads),
            int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        )
        self.layers = [
            self._bind_layer(layer, i, heads, kv_heads)
            for i, layer in enumerate(get_layers(model, resolve_arch(model)))
        ]
        kinds = sorted({op.kind for lay in self.layers for op in (lay.qkv, lay.o, lay.gate_up, lay.down)})
        hidden = int(cfg.hidden_size)
        why = stack.unsupported_reason(self.layers, hidden) if self.native else "native ops are off"
        self.stack = stack.NativeStack(self.layers, hidden) if native_stack and why is None else None
        logger.info(
            "decode loop: %d layers, linears %s, native ops %s, one-call stack %s",
            len(self.layers),
            kinds,
            self.native,
            "on" if self.stack else f"off ({why or 'not asked for'})",
        )
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []
        self.pos = 0

    def _bind_layer(self, layer: nn.Module, i: int, heads: int, kv_heads: int) -> _Layer:
        s = self.spec
        attn = get_submodule(layer, s.attn)
        head_dim = getattr(attn, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim < 2:
            raise ValueError(f"layer {i}: {s.attn} ({type(attn).__name__}) has no integer head_dim")
        window = getattr(attn, "sliding_window", getattr(self.model.config, "sliding_window", None)) or 0
        in_norm, eps = _norm_weight(get_submodule(layer, s.input_norm), f"layer {i} {s.input_norm}")
        post_norm, _ = _norm_weight(get_submodule(layer, s.post_attn_norm), f"layer {i} {s.post_attn_norm}")
        q_norm = k_norm = None
        norm_eps = 1e-6
        if s.q_norm and s.k_norm:
            q_norm, norm_eps = _norm_weight(get_submodule(layer, s.q_norm), f"layer {i} {s.q_norm}")
            k_norm, _ = _norm_weight(get_submodule(layer, s.k_norm), f"layer {i} {s.k_norm}")
        shape = AttentionShape(
            heads, kv_heads, head_dim, float(getattr(attn, "scaling", head_dim**-0.5)), int(window), norm_eps
        )
        qkv = linear.bind([get_submodule(layer, n) for n in s.qkv])
        if qkv.out_features != (heads + 2 * kv_heads) * head_dim:
            raise ValueError(
                f"layer {i}: q/k/v give {qkv.out_features} outputs, expected ({heads} + 2 x {kv_heads}) x {head_dim}"
            )
        return _Layer(
            in_norm,
            post_norm,
            eps,
            qkv,
            linear.bind([get_submodule(layer, s.o)]),
            linear.bind([get_submodule(layer, n) for n in s.gate_up]),
            linear.bind([get_submodule(layer, s.down)]),
            shape,
            q_norm,
            k_norm,
        )

    # ------------------------------------------------------------------ cache
    def start(self, batch: int, max_len: int) -> None:
        """Allocate (or reuse) zeroed-position KV caches for ``batch`` sequences of up to ``max_len`` positions."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"batch and max_len must be positive, got {batch}, {max_len}")
        want = [(batch, lay.shape.kv_heads, max_len, lay.shape.head_dim) for lay in self.layers]
        if [tuple(k.shape) for k in self.k_cache] != want:
            self.k_cache = [torch.zeros(w, dtype=_F32) for w in want]
            self.v_cache = [torch.zeros(w, dtype=_F32) for w in want]
            if self.stack is not None:
                self.stack.bind_caches(self.k_cache, self.v_cache)
        self.pos = 0

    # ------------------------------------------------------------------ forward
    def _rope(self, h: Tensor, t: int) -> tuple[Tensor, Tensor]:
        b = h.shape[0]
        position_ids = torch.arange(self.pos, self.pos + t).unsqueeze(0).expand(b, t)
        cos, sin = self.rotary(h, position_ids)
        d = self.layers[0].shape.head_dim
        if cos.shape[-1] != d:
            raise ValueError(
                f"rotary tables have {cos.shape[-1]} dims but head_dim is {d} (partial rotary is not "
                "supported by awqkit's decode loop)"
            )
        return cos.to(_F32).contiguous(), sin.to(_F32).contiguous()

    def _forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"input ids must be [batch, tokens], got shape {tuple(ids.shape)}")
        b, t = ids.shape
        if not self.k_cache or self.k_cache[0].shape[0] != b:
            raise ValueError(
                f"call start(batch={b}, max_len) before prefill/step (caches are for "
                f"{self.k_cache[0].shape[0] if self.k_cache else 0} sequences)"
            )
        if self.pos + t > self.k_cache[0].shape[2]:
            raise ValueError(
                f"positions {self.pos}..{self.pos + t - 1} exceed the cache's {self.k_cache[0].shape[2]}"
                "; start() with a larger max_len"
            )
        h = self.embed(ids).to(_F32).contiguous()  # [B, T, D]; fresh, updated in place below
        cos, sin = self._rope(h, t)
        if t == 1 and self.stack is not None and b <= MAX_ROWS:
            self.stack(h, self.pos, cos, sin)  # every layer in one native call
        else:
            h = self._layers(h, cos, sin)
        self.pos += t
        last = decode_ops.rms_norm(h[:, -1].contiguous(), self.final_norm, self.final_eps, native_flag=self.native)
        return self.head(last).float()

    def _layers(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The layer stack op by op (prefill, or where the one-call stack does not apply)."""
        b, t, _ = h.shape
        nat = self.native
        for i, lay in enumerate(self.layers):
            x = decode_ops.rms_norm(h, lay.in_norm, lay.eps, native_flag=nat)
            qkv = lay.qkv(x)
            sh = lay.shape
            if nat and t == 1 and sh.head_dim % 8 == 0:
                a = decode_ops.attention_fused(
                    qkv.view(b, -1), self.k_cache[i], self.v_cache[i], self.pos, cos, sin, sh, lay.q_norm, lay.k_norm
                )
            else:
                q, k, v = qkv.split(
                    [sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim, sh.kv_heads * sh.head_dim], dim=-1
                )
                a = decode_ops.attention(
                    q,
                    k,
                    v,
                    self.k_cache[i],
                    self.v_cache[i],
                    self.pos,
                    cos,
                    sin,
                    sh,
                    lay.q_norm,
                    lay.k_norm,
                    native_flag=nat,
                )
            h = lay.o(a, h)
            x = decode_ops.rms_norm(h, lay.post_norm, lay.eps, native_flag=nat)
            h = lay.down(decode_ops.silu_mul(lay.gate_up(x), native_flag=nat), h)
        return h

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """Run a prompt ``[B, T]`` from position 0; returns the last position's logits ``[B, vocab]`` (fp32)."""
        self.pos = 0
        return self._forward(ids)

    @torch.inference_mode()
    def step(self, ids: Tensor) -> Tensor:
        """Append ``ids [B, 1]`` (or ``[B, T]``) at the current position; returns the last logits ``[B, vocab]``."""
        return self._forward(ids)

    def generate(self, ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Tensor:
        """Greedy continuation of ``ids [B, T]``: returns ``[B, <= max_new_tokens]`` new ids (stops early only
        when every sequence has produced ``eos_token_id``; a finished sequence repeats it)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b, t = ids.shape
        self.start(b, t + max_new_tokens)
        nxt = self.prefill(ids).argmax(-1, keepdim=True)
        out, done = [nxt], torch.zeros(b, dtype=torch.bool)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None:
                done |= nxt.view(-1) == eos_token_id
                if bool(done.all()):
                    break
            nxt = self.step(nxt).argmax(-1, keepdim=True)
            if eos_token_id is not None:
                nxt = torch.where(done.view(-1, 1), torch.full_like(nxt, eos_token_id), nxt)
            out.append(nxt)
        return torch.cat(out, dim=1)


def supported() -> list[str]:
    """``config.architectures`` names the decode loop runs."""
    return sorted(a for s in REGISTRY if s.decode is not None for a in s.architectures)


__all__ = ["Decoder", "decode_spec", "supported"]
