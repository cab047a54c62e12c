"""State-dict adapters: InternLM2 Hugging Face layout <-> puyu <-> Llama (and Qwen2) Hugging Face layout.

puyu's names are InternLM2's without the ``model.`` prefix, so that direction is a rename. Llama splits
the packed ``wqkv`` into ``q_proj``/``k_proj``/``v_proj``; InternLM2 packs it per KV group as
``[q_1 .. q_g, k, v]`` (``g`` = query heads per KV head), i.e. the weight viewed as
``[n_kv_heads, g + 2, head_dim, dim]``. Both use the rotate-half RoPE convention, so no row permutation
is needed. Qwen2 is the Llama layout plus ``q/k/v_proj.bias``, packed into ``wqkv.bias`` the same way.
All conversions only move and reshape tensors, so round trips are exact.

Tied embeddings: a tied puyu model has ``output.weight`` and ``tok_embeddings.weight`` as one tensor;
the HF layouts then omit ``output.weight``/``lm_head.weight`` (``tie_word_embeddings=True``).
"""
from __future__ import annotations

import re

import torch

from puyu.model.config import ModelArgs

Tensors = dict[str, torch.Tensor]

# puyu per-layer suffix -> Llama HF per-layer suffix (everything but wqkv, which is split)
_LAYER_TO_LLAMA = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_FROM_LLAMA = {v: k for k, v in _LAYER_TO_LLAMA.items()}
_TOP_TO_LLAMA = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_TOP_FROM_LLAMA = {v: k for k, v in _TOP_TO_LLAMA.items()}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_LLAMA_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class StateDictError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and mis-shaped tensor."""


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The puyu parameter names and shapes for ``args`` (``output.weight`` omitted when tied)."""
    d, hd = args.dim, args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = ((args.n_heads + 2 * args.n_kv_heads) * hd, d)
        if args.qkv_bias:
            shapes[p + "attention.wqkv.bias"] = ((args.n_heads + 2 * args.n_kv_heads) * hd,)
        shapes[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        shapes[p + "feed_forward.w1.weight"] = (args.ffn_hidden_dim, d)
        shapes[p + "feed_forward.w3.weight"] = (args.ffn_hidden_dim, d)
        shapes[p + "feed_forward.w2.weight"] = (d, args.ffn_hidden_dim)
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    return shapes


def check_state_dict(state: Tensors, expected: dict[str, tuple[int, ...]], what: str = "checkpoint") -> None:
    """Raise one ``StateDictError`` naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: got {tuple(state[k].shape)}, expected {expected[k]}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or misshaped:
        lines = [f"{what} does not match the model:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if names:
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names))
        raise StateDictError("\n".join(lines))


def puyu_state_dict(model: torch.nn.Module) -> Tensors:
    """The model's tensors under puyu names, without the duplicate ``output.weight`` when tied."""
    state = dict(model.state_dict())
    if model.args.tie_embeddings:
        state.pop("output.weight", None)
    return state


# ---- InternLM2 HF <-> puyu -------------------------------------------------------------------------
def from_internlm2(state: Tensors) -> Tensors:
    return {k if k == "output.weight" else k.removeprefix("model."): v for k, v in state.items()}


def to_internlm2(state: Tensors) -> Tensors:
    return {k if k == "output.weight" else "model." + k: v for k, v in state.items()}


# ---- Llama HF <-> puyu -----------------------------------------------------------------------------
def _wqkv_view(args: ModelArgs, wqkv: torch.Tensor) -> torch.Tensor:
    """A packed ``wqkv`` weight [(Hq+2Hk)*d, D] or bias [(Hq+2Hk)*d] as [Hk, g+2, d, ...]."""
    return wqkv.view(args.n_kv_heads, args.n_groups + 2, args.head_dim, *wqkv.shape[1:])


def split_qkv(args: ModelArgs, wqkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed grouped ``wqkv`` (weight or bias) -> Llama's q [Hq*d, ...], k and v [Hk*d, ...]."""
    w, g, rest = _wqkv_view(args, wqkv), args.n_groups, wqkv.shape[1:]
    return (w[:, :g].reshape(-1, *rest), w[:, g].reshape(-1, *rest), w[:, g + 1].reshape(-1, *rest))


def _pack_qkv(args: ModelArgs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split_qkv``: interleave per KV head as [q_1 .. q_g, k, v]."""
    hk, g, hd, rest = args.n_kv_heads, args.n_groups, args.head_dim, q.shape[1:]
    packed = torch.cat([q.view(hk, g, hd, *rest), k.view(hk, 1, hd, *rest), v.view(hk, 1, hd, *rest)], dim=1)
    return packed.reshape(-1, *rest)  # [Hk*(g+2)*d, ...]


_QKV = {f"self_attn.{n}_proj.{kind}": (n, kind) for n in "qkv" for kind in ("weight", "bias")}


def to_llama(state: Tensors, args: ModelArgs) -> Tensors:
    out: Tensors = {}
    for key, t in state.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            out[_TOP_TO_LLAMA.get(key, key)] = t
            continue
        i, suffix = m.groups()
        p = f"model.layers.{i}."
        if suffix in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = suffix.rsplit(".", 1)[1]
            for n, part in zip("qkv", split_qkv(args, t)):
                out[p + f"self_attn.{n}_proj.{kind}"] = part
        else:
            out[p + _LAYER_TO_LLAMA.get(suffix, suffix)] = t
    return out


def from_llama(state: Tensors, args: ModelArgs) -> Tensors:
    """Llama/Qwen2 HF names -> puyu names. q/k/v of a layer (weights, and biases where present) are
    packed into ``wqkv`` once all three are seen; a layer missing one of them, or with the wrong shapes,
    keeps the pieces it has under their HF names so that ``check_state_dict`` reports them rather than
    this function failing half-way."""
    out: Tensors = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _LLAMA_LAYER_KEY.match(key)
        if m is None:
            out[_TOP_FROM_LLAMA.get(key, key)] = t
            continue
        i, suffix = m.groups()
        if suffix in _QKV:
            n, kind = _QKV[suffix]
            qkv.setdefault((i, kind), {})[n] = t
        else:
            out[f"layers.{i}." + _LAYER_FROM_LLAMA.get(suffix, suffix)] = t
    hd, d = args.head_dim, args.dim
    for (i, kind), parts in qkv.items():
        rest = (d,) if kind == "weight" else ()
        want = {"q": (args.n_heads * hd, *rest), "k": (args.n_kv_heads * hd, *rest), "v": (args.n_kv_heads * hd, *rest)}
        if set(parts) != set("qkv") or any(tuple(parts[n].shape) != want[n] for n in "qkv"):
            out.update({f"model.layers.{i}.self_attn.{n}_proj.{kind}": t for n, t in parts.items()})
            continue
        out[f"layers.{i}.attention.wqkv.{kind}"] = _pack_qkv(args, parts["q"], parts["k"], parts["v"])
    return out


def convert(state: Tensors, src: str, dst: str, args: ModelArgs) -> Tensors:
    """Convert between layouts ``"puyu"``, ``"internlm2"`` and ``"llama"`` (through puyu)."""
    to_puyu = {"puyu": lambda s: dict(s), "internlm2": from_internlm2, "llama": lambda s: from_llama(s, args)}
    from_puyu = {"puyu": lambda s: dict(s), "internlm2": to_internlm2, "llama": lambda s: to_llama(s, args)}
    if src not in to_puyu or dst not in from_puyu:
        raise ValueError(f"unknown layout {src!r} or {dst!r}; expected puyu, internlm2 or llama")
    return from_puyu[dst](to_puyu[src](state))
