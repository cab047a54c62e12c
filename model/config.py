"""Model configuration: one dataclass and the named flavors every stage refers to.

Shapes of other families (Llama, Qwen2) come from their Hugging Face ``config.json`` through
:mod:`puyu.model.hf`; ``qkv_bias`` and the RoPE scaling kinds are what those families add. The
published InternLM2 shapes are fixed by the released checkpoints (vocab 92544, GQA with 8 KV heads,
RMSNorm eps 1e-5, RoPE base 1e6, SwiGLU, no biases). ``tiny`` is the same architecture small enough for
CPU tests and the demo; it keeps GQA (4 query heads per KV head) so the grouped ``wqkv`` layout is exercised.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


ROPE_KINDS = ("none", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE is stretched beyond the trained context; the formulas Hugging Face publishes for each kind.

    ``kind``:
    - ``"none"``;
    - ``"linear"``: inverse frequencies divided by ``factor`` (positions interpolated);
    - ``"dynamic"``: NTK-aware base growth once the sequence is longer than ``max_seq_len`` (InternLM2);
    - ``"llama3"``: Llama 3.1's per-frequency rule: wavelengths above ``original_max_seq_len /
      low_freq_factor`` divided by ``factor``, below ``original_max_seq_len / high_freq_factor`` kept, a
      smooth blend between;
    - ``"yarn"``: NTK-by-parts interpolation between ``beta_fast`` and ``beta_slow`` rotations, cos/sin
      scaled by ``attention_factor`` (from ``factor``/``mscale``/``mscale_all_dim`` when 0).
    ``original_max_seq_len`` is the pretraining context of llama3/yarn (0: ``ModelArgs.max_seq_len``).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn; 0: derived
    mscale: float = 0.0  # yarn (DeepSeek-style attention factor)
    mscale_all_dim: float = 0.0  # yarn
    truncate: bool = True  # yarn: correction range rounded to whole dimensions

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; expected one of {', '.join(ROPE_KINDS)}")
        if self.kind != "none" and self.factor < 1.0:
            raise ValueError(f"RoPE scaling factor must be >= 1, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"llama3 RoPE needs high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


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
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
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
        bias = (self.n_heads + 2 * self.n_kv_heads) * hd if self.qkv_bias else 0
        layer = attn + bias + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + self.dim


_DYNAMIC_2X = RopeScaling(kind="dynamic", factor=2.0)

FLAVORS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(
        dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1024, ffn_hidden_dim=688, max_seq_len=512
    ),
    # ~100M parameters (75M in the blocks; 88M with a vocab of 8k, 124M with 32k): the size benchmarks use to
    # show what 2 layers hide
    "small": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden_dim=2048, max_seq_len=2048),
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
