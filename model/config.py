"""Model configuration: one dataclass and the named flavors every stage refers to.

The published InternLM2 shapes are fixed by the released checkpoints (vocab 92544, GQA with 8 KV heads,
RMSNorm eps 1e-5, RoPE base 1e6, SwiGLU, no biases). ``tiny`` is the same architecture small enough for
CPU tests and the demo; it keeps GQA (4 query heads per KV head) so the grouped ``wqkv`` layout is exercised.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE is stretched beyond ``max_seq_len``.

    ``kind``: ``"none"``, ``"linear"`` (positions divided by ``factor``) or ``"dynamic"`` (NTK-aware base
    growth once the sequence is longer than ``max_seq_len``; the formula InternLM2 and Llama HF publish).
    """

    kind: str = "none"
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "dynamic"):
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; expected none, linear or dynamic")
        if self.kind != "none" and self.factor < 1.0:
            raise ValueError(f"RoPE scaling factor must be >= 1, got {self.factor}")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 92544
    ffn_hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 32768  # the trained context length (HF max_position_embeddings)
    tie_embeddings: bool = False
    # The one switch for the fused C++/CUDA kernels (puyu.model.ops); falls back to the PyTorch
    # reference, with a log line, when the extension was not built for the tensors' device.
    fused_ops: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_groups(self) -> int:
        """Query heads per KV head (the ``g`` of the packed ``wqkv`` layout)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count implied by the shapes (embeddings counted once when tied)."""
        hd = self.head_dim
        attn = self.dim * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * self.dim
        ffn = 3 * self.dim * self.ffn_hidden_dim
        layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + self.dim


_DYNAMIC_2X = RopeScaling(kind="dynamic", factor=2.0)

FLAVORS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(
        dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1024, ffn_hidden_dim=688, max_seq_len=512
    ),
    "1_8b": ModelArgs(
        dim=2048, n_layers=24, n_heads=16, n_kv_heads=8, ffn_hidden_dim=8192, rope_scaling=_DYNAMIC_2X
    ),
    "7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, rope_scaling=_DYNAMIC_2X
    ),
    "20b": ModelArgs(
        dim=6144, n_layers=48, n_heads=48, n_kv_heads=8, ffn_hidden_dim=16384, rope_scaling=_DYNAMIC_2X
    ),
}


def get_flavor(name: str, **overrides) -> ModelArgs:
    """A copy of flavor ``name`` with ``overrides`` applied (e.g. ``fused_ops=False``)."""
    if name not in FLAVORS:
        raise KeyError(f"unknown model flavor {name!r}; known: {sorted(FLAVORS)}")
    return dataclasses.replace(FLAVORS[name], **overrides)
