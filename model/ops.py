"""Fused training ops (RMSNorm, RoPE on q and k, SwiGLU, linear + cross-entropy) with their PyTorch
references, and the helpers that load a compiled kernel module and route calls to it.

Every op has a plain PyTorch ``*_reference`` that defines its semantics, and a fused path backed by the
C++/CUDA extension ``puyu.model._fused_ops`` built from ``csrc/`` by setup.py. The model picks between
them with one switch (``ModelArgs.fused_ops``, passed here as ``fused=``). When the extension is missing,
or was built without kernels for the tensors' device, the fused path falls back to the reference and
says so once in the log, so a CPU-only build or a missing toolkit never breaks a run.

Each kernel is also a ``torch.library`` custom op (``torch.ops.puyu.*``) with a fake kernel (output shapes
and dtypes from the inputs') and, for the training ops, its backward registered with ``register_autograd``:
``torch.compile`` puts them in its graph instead of breaking the graph there, and a model built on the
meta device propagates shapes through them. ``_route`` says when a call goes through the dispatcher.

The cross-entropy never materialises the full ``[N, vocab]`` fp32 softmax: it walks the tokens in
chunks, computes each chunk's logits from the hidden states (fused with the output projection), turns
them into the loss and, in the same pass, into the gradient, and keeps only ``grad_hidden`` and
``grad_weight`` for backward. Its fallback keeps the chunking and only swaps the per-chunk kernel.

The serving runtime's own kernels (RoPE into a paged KV cache, paged decode attention, quantized linears,
the caching allocator) are in ``puyu.serving.ops`` and its extension ``puyu.serving._serving_ops``; they
load and route through ``load_extension`` and ``route`` here, so this module never imports serving.
"""
from __future__ import annotations

import importlib
import logging
import math
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def load_extension(module: str, label: str) -> tuple[ModuleType | None, str | None]:
    """Imports one of puyu's compiled kernel modules -> (module, None), or (None, one line saying why not).

    The extensions are optional (no compiler, or torch absent at build time), so a miss is logged once,
    naming ``label``, and callers fall back to the PyTorch references. A build for AVX2 counts as missing on
    a CPU without it: its first kernel would crash the process. Loads this module's ``_fused_ops`` and
    ``puyu.serving.ops``'s ``_serving_ops``.
    """
    try:
        ext = importlib.import_module(module)
    except ImportError as err:
        log.warning("puyu %s extension not built (%s); using the PyTorch reference ops", label, err)
        return None, f"{module} does not import ({err})"
    if ext.cpu_isa() == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.warning("puyu %s were built for AVX2 but this CPU lacks it; using the PyTorch reference ops", label)
        return None, f"{module} was built for AVX2 and this CPU lacks it"
    return ext, None


_ext, _ext_problem = load_extension("puyu.model._fused_ops", "fused ops")
# Asked once: torch.compile cannot trace a call into the extension module.
_CUDA_KERNELS = _ext is not None and _ext.has_cuda()

_warned_devices: set[str] = set()

# Bytes of logits one cross-entropy chunk may hold; the chunk's rows follow from the vocabulary size
# (rounded down to a multiple of 64: the matmuls run markedly slower per row on small, odd chunks).
CE_CHUNK_BYTES = 128 * 2**20


def extension_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernels serve tensors on ``device`` (CPU always when built; CUDA if compiled in)."""
    if _ext is None:
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and _CUDA_KERNELS)


def extension_problem() -> str | None:
    """One line saying why the compiled kernels are not in use, or None when they are (``make test`` fails on it)."""
    return _ext_problem


def _use_ext(fused: bool, t: torch.Tensor) -> bool:
    if not fused:
        return False
    if extension_available(t.device):
        return True
    kind = t.device.type
    if _ext is not None and kind not in _warned_devices:
        _warned_devices.add(kind)
        log.warning("puyu fused ops have no %s kernels in this build; using the PyTorch reference ops", kind)
    return False


def route(fused: bool, t: torch.Tensor, usable: Callable[[torch.Tensor], bool], *differentiable: torch.Tensor) -> str:
    """How a call on ``t`` is served: "reference", "op" (the ``torch.ops.puyu`` custom op) or "ext" (the
    extension's function called directly, the op's own implementation). ``usable(t)`` says whether the
    compiled kernels serve ``t``'s device; it is asked only for tensors that hold values.

    The op for meta tensors (its fake kernel gives the shapes, with or without the extension), for what
    torch.compile or another tracer sees (fake tensors, tensor subclasses), and for calls autograd records
    (``differentiable`` inputs that require a gradient): ``register_autograd`` gives their backward.
    Eager calls that record no graph call the extension directly. That is serving's decode step, which runs
    rms_norm, rope, swiglu, rope_cache_write and paged attention per layer per step: at its shapes (tiny
    flavor, 8 sequences) the direct calls take 4-20 us, and ``torch.ops.puyu`` would add 4-8 us to each
    functional op and 20 us to rope_cache_write, which mutates the cache (one thread, timeit).
    """
    if not fused:
        return "reference"
    if t.is_meta:
        return "op"
    if not usable(t):
        return "reference"
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return "op"
    if torch.is_grad_enabled() and any(i.requires_grad for i in differentiable):
        return "op"
    return "ext"


def _route(fused: bool, t: torch.Tensor, *differentiable: torch.Tensor) -> str:
    """``route`` for this module's training ops (warns once per device without kernels)."""
    return route(fused, t, lambda x: _use_ext(True, x), *differentiable)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the kernels compute in: fp64 for fp64 inputs, else fp32 (the references match it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32 (fp64 for fp64) and rounded once."""
    xf = x.to(opmath_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N], weight [N] -> y [..., N] (x's dtype), rstd [M] (opmath; M rows of x, kept for the backward)."""
    y, rstd = _ext.rms_norm_fwd(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), eps)  # y [M, N]
    return y.view(x.shape), rstd


def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x [..., N], weight [N], rstd [M] -> dx [..., N], dweight [N] (weight's dtype)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, N]
    dx, dw = _ext.rms_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, weight.contiguous(), rstd)
    return dx.view(x.shape), dw


_rms_norm_op = torch.library.custom_op("puyu::rms_norm", _rms_norm_fwd, mutates_args=())
_rms_norm_bwd_op = torch.library.custom_op("puyu::rms_norm_backward", _rms_norm_bwd, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(math.prod(x.shape[:-1]), dtype=opmath_dtype(x.dtype))


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(dy, x, weight, rstd)
    return dx, dw, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = True) -> torch.Tensor:
    """RMSNorm over the last dim; x [..., N], weight [N]."""
    path = _route(fused, x, x, weight)
    if path == "reference":
        return rms_norm_reference(x, weight, eps)
    return (_rms_norm_fwd if path == "ext" else _rms_norm_op)(x, weight, eps)[0]


# ----------------------------------------------------------------------------------------------------
# RoPE on q and k
# ----------------------------------------------------------------------------------------------------
def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the two halves of each head. q [B, T, Hq, d], k [B, T, Hk, d], cos/sin [B, T, d/2]."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(opmath_dtype(x.dtype))
        c, s = cos.to(xf.dtype)[:, :, None, :], sin.to(xf.dtype)[:, :, None, :]  # [B, T, 1, d/2]
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def _rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, Hq, d], k [B, T, Hk, d] rotated by the angles of cos/sin [B, T, d/2] (opmath), or back by
    them (``inverse``: the backward, as the rotation is orthogonal) -> new q, k."""
    q_out, k_out = _ext.rope_fwd(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous(), inverse)
    return q_out, k_out


_rope_op = torch.library.custom_op("puyu::rope", _rope, mutates_args=())


@_rope_op.register_fake
def _(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(dq, dk, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


_rope_op.register_autograd(_rope_grad, setup_context=_rope_setup)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [B, T, Hq, d] and k [B, T, Hk, d] in one pass; cos/sin [B, T, d/2] (no gradient)."""
    path = _route(fused, q, q, k)
    if path == "reference":
        return rope_reference(q, k, cos, sin)
    opmath = opmath_dtype(q.dtype)
    return (_rope if path == "ext" else _rope_op)(q, k, cos.to(opmath), sin.to(opmath), False)


# ----------------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------------
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, computed in fp32 (fp64 for fp64) and rounded once."""
    opmath = opmath_dtype(gate.dtype)
    return (F.silu(gate.to(opmath)) * up.to(opmath)).to(gate.dtype)


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [*] -> silu(gate) * up [*]."""
    return _ext.swiglu_fwd(gate.contiguous(), up.contiguous())


def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, gate, up [*] -> dgate, dup [*]."""
    dgate, dup = _ext.swiglu_bwd(dy.contiguous(), gate.contiguous(), up.contiguous())
    return dgate, dup


_swiglu_op = torch.library.custom_op("puyu::swiglu", _swiglu_fwd, mutates_args=())
_swiglu_bwd_op = torch.library.custom_op("puyu::swiglu_backward", _swiglu_bwd, mutates_args=())


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dy):
    return _swiglu_bwd_op(dy, *ctx.saved_tensors)


_swiglu_op.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """SwiGLU activation of the FFN: ``silu(gate) * up`` for two same-shaped tensors."""
    path = _route(fused, gate, gate, up)
    if path == "reference":
        return swiglu_reference(gate, up)
    return (_swiglu_fwd if path == "ext" else _swiglu_op)(gate, up)


# ----------------------------------------------------------------------------------------------------
# Output projection + cross-entropy
# ----------------------------------------------------------------------------------------------------
def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, target)`` with fp32 logits: the whole [N, V] matrix at once."""
    logits = (hidden @ weight.T).to(opmath_dtype(hidden.dtype))  # [N, V]
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def _ce_chunk_torch(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, grad_scale: float, with_grad: bool
) -> torch.Tensor:
    """PyTorch version of the extension's per-chunk kernel (same contract as ``_ext.ce_chunk``).

    Returns the per-row loss [C] (0 for ignored rows) and, if ``with_grad``, overwrites ``logits`` [C, V]
    with ``grad_scale * (softmax - onehot)`` (0 for ignored rows).
    """
    lf = logits.to(opmath_dtype(logits.dtype))
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)[:, None]
    lse = torch.logsumexp(lf, dim=-1)
    loss = torch.where(valid, lse - lf.gather(1, safe)[:, 0], 0.0)
    if with_grad:
        grad = torch.exp(lf - lse[:, None])
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        grad.mul_((valid * grad_scale).to(grad.dtype)[:, None])
        logits.copy_(grad)
    return loss


def _ce_chunk(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, grad_scale: float,
              with_grad: bool) -> torch.Tensor:
    return _ext.ce_chunk(logits, target, ignore_index, grad_scale, with_grad)


# Declared as mutating logits: with_grad overwrites them with their gradient (a schema cannot depend on a flag).
_ce_chunk_op = torch.library.custom_op("puyu::ce_chunk", _ce_chunk, mutates_args=("logits",))


@_ce_chunk_op.register_fake
def _(logits, target, ignore_index, grad_scale, with_grad):
    return logits.new_empty(logits.shape[0], dtype=opmath_dtype(logits.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, reduction, chunk_rows, use_ext, grad_h, grad_w):
        n_tokens = hidden.shape[0]
        # Meta tensors hold no values to count; the loss there only carries its shape and dtype.
        n_valid = n_tokens if hidden.is_meta else int((target != ignore_index).sum())
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        kernel = _ce_chunk_op if use_ext else _ce_chunk_torch
        opmath = opmath_dtype(hidden.dtype)
        with_grad = grad_h or grad_w
        grad_hidden = torch.empty_like(hidden) if grad_h else None
        # Accumulate the weight gradient in fp32 across chunks; low-precision sums would drift. A frozen
        # weight (LoRA's head) skips this [V, D] product, a third of the head's work.
        grad_weight = torch.zeros(weight.shape, dtype=opmath, device=weight.device) if grad_w else None
        total = torch.zeros((), dtype=opmath, device=hidden.device)
        # One logits buffer for all chunks: [C, V], overwritten in place with the logits' gradient.
        buffer = torch.empty(max(1, min(chunk_rows, n_tokens)), weight.shape[0], dtype=hidden.dtype,
                             device=hidden.device)
        for start in range(0, n_tokens, chunk_rows):
            h = hidden[start : start + chunk_rows]  # [C, D]
            logits = torch.mm(h, weight.T, out=buffer[: h.shape[0]])  # [C, V]
            total += kernel(logits, target[start : start + chunk_rows], ignore_index, scale, with_grad).sum()
            if grad_h:
                torch.mm(logits, weight, out=grad_hidden[start : start + chunk_rows])
            if grad_w:
                if grad_weight.dtype == logits.dtype:
                    grad_weight.addmm_(logits.T, h)
                else:
                    grad_weight += torch.mm(logits.T, h)
        if with_grad:
            ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total * scale  # fp32 (fp64 for fp64), like the reference's fp32 logits

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # loss.backward() needs no [V, D] copy
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss
            grad_weight = None if grad_weight is None else grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    fused: bool = True,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden [N, D] @ weight[V, D].T`` against ``target [N]`` ("mean" or "sum").

    ``fused=True``: chunked, ``chunk_rows`` tokens at a time (default: <= 128 MiB of logits per chunk), with
    the per-chunk softmax/gradient kernel from the extension when built for the device. ``fused=False``:
    the plain reference that holds all logits.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not fused:
        return linear_cross_entropy_reference(hidden, weight, target, ignore_index, reduction)
    device_type = hidden.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # Autocast never reaches the chunked products below (they write into a preallocated buffer), so
        # cast here as it casts a linear: else the head, the largest matmul, runs in fp32 (on an H200 the
        # 1b flavor's step took 2.2x as long, two thirds of it in fp32 GEMMs).
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if chunk_rows is None:  # logits are in hidden's dtype: bf16 chunks hold twice the rows of fp32 ones
        rows = CE_CHUNK_BYTES // (hidden.element_size() * weight.shape[0])
        chunk_rows = rows - rows % 64 if rows >= 64 else max(rows, 1)
    # The kernel goes through its op even in eager: it runs once per chunk of up to 128 MiB of logits.
    use_ext = _route(True, hidden) != "reference"
    # Decided here: inside forward grad mode is off, so evaluation would otherwise pay for gradients.
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden.contiguous(), weight.contiguous(), target.contiguous(), ignore_index, reduction, chunk_rows, use_ext,
        grad and hidden.requires_grad, grad and weight.requires_grad,
    )
