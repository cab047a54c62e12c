"""Hugging Face model directories in and out: the one loader every stage takes a model through.

A directory a user brings holds ``config.json`` (``model_type`` names the family), the weights (one
``model.safetensors``, shards with ``model.safetensors.index.json``, or the older ``pytorch_model.bin``
/ sharded ``.bin`` with its index) and tokenizer files (read by :mod:`puyu.model.tokenizer`).

Families and how they map onto puyu's one architecture (pre-norm RMSNorm, RoPE rotate-half, GQA,
SwiGLU):
- ``llama`` (and ``mistral`` without a sliding window): separate q/k/v projections, packed on load;
- ``qwen2``: the Llama layout with biases on q/k/v (``ModelArgs.qkv_bias``), no sliding window;
- ``internlm2``: puyu's own layout under a ``model.`` prefix (packed grouped ``wqkv``, ``auto_map`` config).
RoPE scaling comes from ``rope_parameters`` (transformers v5) or ``rope_scaling`` + ``rope_theta`` (v4
and InternLM2), any of linear, dynamic, llama3 and yarn. What puyu cannot run (a sliding window, an
output-projection bias, another activation, a head size other than hidden/heads) is refused naming
the key, not silently loaded into a different model.

A puyu export (``save_model``: puyu-layout safetensors without ``config.json``) is read too; its shapes
come from a named flavor with the vocabulary, layer count and tying read off the tensors.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from puyu.launcher.errors import PuyuError
from puyu.model.checkpoint import INDEX_FILE, SINGLE_FILE, load_safetensors, save_model
from puyu.model.config import ModelArgs, RopeScaling, get_flavor
from puyu.model.model import Transformer
from puyu.model.state_dict import Tensors, check_state_dict, convert, expected_shapes

CONFIG_FILE = "config.json"
BIN_FILE, BIN_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
# model_type -> state-dict layout (puyu.model.state_dict.convert)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "internlm2": "internlm2"}
# What a Hugging Face directory keeps its tokenizer in (the vocabulary itself in one of the first two)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")
_ROPE_KINDS = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn"}


class ModelDirError(PuyuError, ValueError):
    """A model directory that cannot be read: the message names the file and key at fault."""


def is_hf_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory with a ``config.json`` naming a ``model_type``."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a model directory, or a one-line error naming the file."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise ModelDirError(f"{path}: no {CONFIG_FILE} (not a Hugging Face model directory)")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelDirError(f"{config}: no model_type key")
    return data


def _rope_scaling(config: dict, where: str) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) from either spelling transformers has used."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = params.get("rope_theta", config.get("rope_theta", 1e4))
    name = scaling.get("rope_type", scaling.get("type", "default"))
    if name not in _ROPE_KINDS:
        raise ModelDirError(f"{where}: rope_scaling type {name!r} is not supported; expected one of "
                            f"{sorted(_ROPE_KINDS)}")
    kind = _ROPE_KINDS[name]
    if kind == "none":
        return theta, RopeScaling()
    fields = {"factor": scaling.get("factor")}
    if fields["factor"] is None:
        raise ModelDirError(f"{where}: rope_scaling of type {name!r} has no factor")
    original = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if original:
        fields["original_max_seq_len"] = int(original)
    if kind == "llama3":
        fields.update(low_freq_factor=scaling["low_freq_factor"], high_freq_factor=scaling["high_freq_factor"])
        if not original:
            raise ModelDirError(f"{where}: llama3 rope_scaling needs original_max_position_embeddings")
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if scaling.get(key):
                fields[key] = float(scaling[key])
        fields["truncate"] = bool(scaling.get("truncate", True))
    try:
        return theta, RopeScaling(kind, **fields)
    except ValueError as exc:
        raise ModelDirError(f"{where}: rope_scaling: {exc}") from None


def _refuse(config: dict, where: str) -> None:
    """Refuse what puyu's architecture cannot express, naming the key."""
    family = config["model_type"]
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (puyu runs SwiGLU: silu)")
    if family == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        problems.append("attention_bias/mlp_bias=true (puyu has no output-projection or MLP biases)")
    if family == "internlm2" and config.get("bias"):
        problems.append("bias=true (puyu's InternLM2 has no biases)")
    if family == "mistral" and config.get("sliding_window"):
        problems.append(f"sliding_window={config['sliding_window']} (puyu attends to the whole context)")
    if family == "qwen2" and config.get("use_sliding_window"):
        problems.append("use_sliding_window=true (puyu attends to the whole context)")
    head_dim = config.get("head_dim")
    if head_dim and head_dim != config["hidden_size"] // config["num_attention_heads"]:
        problems.append(f"head_dim={head_dim} differs from hidden_size / num_attention_heads")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor != 1 (puyu rotates the whole head)")
    if problems:
        raise ModelDirError(f"{where}: unsupported {family} config: " + "; ".join(problems))


def args_from_hf_config(config: dict, where: str = CONFIG_FILE, **overrides) -> ModelArgs:
    """``ModelArgs`` from a Llama, Mistral, Qwen2 or InternLM2 HF ``config.json`` dict."""
    family = config.get("model_type", "llama")
    if family not in FAMILIES:
        raise ModelDirError(f"{where}: model_type {family!r} is not supported; expected one of {sorted(FAMILIES)}")
    _refuse(config, where)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in config]
    if missing:
        raise ModelDirError(f"{where}: missing key(s) {missing}")
    theta, scaling = _rope_scaling(config, where)
    try:
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            ffn_hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=config.get("max_position_embeddings", 2048),
            tie_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=family == "qwen2",
            **overrides,
        )
    except ValueError as exc:
        raise ModelDirError(f"{where}: {exc}") from None


def read_hf_weights(path: str | Path) -> Tensors:
    """Every tensor of a model directory: safetensors (single or sharded) or PyTorch ``.bin`` (single or
    sharded), the latter read with ``weights_only`` so a checkpoint cannot run code."""
    path = Path(path)
    if (path / INDEX_FILE).exists() or (path / SINGLE_FILE).exists():
        return load_safetensors(path)
    files = []
    if (path / BIN_INDEX_FILE).exists():
        files = sorted(set(json.loads((path / BIN_INDEX_FILE).read_text())["weight_map"].values()))
    elif (path / BIN_FILE).exists():
        files = [BIN_FILE]
    if not files:
        raise ModelDirError(f"{path}: no weights ({SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or {BIN_INDEX_FILE})")
    state: Tensors = {}
    for name in files:
        try:
            state.update(torch.load(path / name, map_location="cpu", weights_only=True, mmap=True))
        except (OSError, RuntimeError) as exc:
            raise ModelDirError(f"{path / name}: cannot read ({str(exc).splitlines()[0]})") from None
    return state


def _hf_args(path: Path, fused_ops: bool) -> tuple[ModelArgs, str]:
    """An HF directory's ``ModelArgs`` (from its ``config.json``) and its state-dict layout."""
    config = read_hf_config(path)
    return args_from_hf_config(config, where=str(path / CONFIG_FILE), fused_ops=fused_ops), FAMILIES[config["model_type"]]


def _puyu_dir_args(path: Path, raw: Tensors, flavor: str, fused_ops: bool) -> ModelArgs:
    emb = raw.get("tok_embeddings.weight")
    if emb is None:
        raise ModelDirError(f"{path}: no {CONFIG_FILE} and no tensor tok_embeddings.weight: neither a Hugging Face "
                            f"model directory nor a puyu export")
    n_layers = 1 + max(int(k.split(".")[1]) for k in raw if k.startswith("layers."))
    return get_flavor(flavor, vocab_size=emb.shape[0], n_layers=n_layers, fused_ops=fused_ops,
                      tie_embeddings="output.weight" not in raw,
                      qkv_bias="layers.0.attention.wqkv.bias" in raw)


def read_model_dir(path: str | Path, fused_ops: bool = True, flavor: str = "tiny") -> tuple[ModelArgs, Tensors]:
    """``ModelArgs`` and the puyu-layout state dict of an HF model directory (or a puyu export, whose
    shapes come from ``flavor``), validated: a mismatch names every offending tensor."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} not found")
    raw = read_hf_weights(path)
    if is_hf_model_dir(path):
        args, layout = _hf_args(path, fused_ops)
    else:
        args, layout = _puyu_dir_args(path, raw, flavor, fused_ops), "puyu"
    state = convert(raw, layout, "puyu", args)
    if args.tie_embeddings:
        state.pop("output.weight", None)  # some tied checkpoints store the head anyway
    check_state_dict(state, expected_shapes(args), what=f"{layout} checkpoint {path}")
    return args, state


class ModelDirWeights(Mapping):
    """A model directory's weights under puyu names, each read from disk when asked for (q/k/v packed
    into ``wqkv`` on the way), so a rank that materialises only its shards never holds the whole model.

    ``shapes()`` gives every tensor as a meta tensor from the files' headers alone, for validation
    before anything is read. PyTorch ``.bin`` files are memory-mapped (``torch.load(mmap=True)``).
    """

    def __init__(self, path: str | Path, args: ModelArgs, layout: str):
        from safetensors import safe_open

        self.path, self.args, self.layout, self._open = Path(path), args, layout, safe_open
        self.files: dict[str, Path] = {}
        self._bin: Tensors = {}
        if (self.path / INDEX_FILE).exists():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            self.files = {name: self.path / fname for name, fname in weight_map.items()}
        elif (self.path / SINGLE_FILE).exists():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                self.files = {name: self.path / SINGLE_FILE for name in f.keys()}
        else:
            self._bin = read_hf_weights(self.path)
        self.expected = expected_shapes(args)
        self.names = list(self.expected)

    def _raw(self, name: str) -> torch.Tensor:
        if self._bin:
            return self._bin[name]
        with self._open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def _sources(self, name: str) -> list[str]:
        """The checkpoint's tensor names that make up puyu's ``name`` (three for a packed wqkv)."""
        return list(convert({name: torch.empty(self.expected[name], device="meta")}, "puyu", self.layout, self.args))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        sources = self._sources(name)
        state = convert({n: self._raw(n) for n in sources}, self.layout, "puyu", self.args)
        return state[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shapes(self) -> Tensors:
        """Every tensor, puyu-named, as a meta tensor of its shape (headers only)."""
        if self._bin:
            meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._bin.items()}
        else:
            meta = {}
            for file in sorted(set(self.files.values())):
                with self._open(file, framework="pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        meta[k] = torch.empty(sl.get_shape(), device="meta")
        state = convert(meta, self.layout, "puyu", self.args)
        if self.args.tie_embeddings:
            state.pop("output.weight", None)
        return state


def open_model_dir(path: str | Path, args: ModelArgs) -> tuple[ModelArgs, ModelDirWeights]:
    """Shapes and lazily-read, validated weights of a model directory: an HF one (shapes from its
    ``config.json``, ``args`` supplying only ``fused_ops``) or a puyu export (shapes are ``args``).
    A mismatch raises ``StateDictError`` naming every missing, unexpected or mis-shaped tensor."""
    path = Path(path)
    args, layout = _hf_args(path, args.fused_ops) if is_hf_model_dir(path) else (args, "puyu")
    weights = ModelDirWeights(path, args, layout)
    check_state_dict(weights.shapes(), expected_shapes(args), what=f"{layout} checkpoint {path}")
    return args, weights


def load_hf_model(path: str | Path, fused_ops: bool = True, dtype: torch.dtype | None = None,
                  flavor: str = "tiny") -> Transformer:
    """A ``Transformer`` holding the weights of the model directory ``path`` (in ``dtype`` if given)."""
    args, state = read_model_dir(path, fused_ops, flavor)
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype) if dtype is not None else model


def has_tokenizer(path: str | Path) -> bool:
    """Whether a directory holds a tokenizer's vocabulary (``tokenizer.json`` or ``tokenizer.model``)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES[:2])


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy a tokenizer (a directory's ``TOKENIZER_FILES`` that exist, or one file) into ``dst``; the
    names copied."""
    import shutil

    src, dst = Path(src), Path(dst)
    sources = [src / f for f in TOKENIZER_FILES] if src.is_dir() else [src]
    copied = []
    for f in sources:
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


# ---- export --------------------------------------------------------------------------------------------
def _rope_fields(args: ModelArgs) -> dict:
    s = args.rope_scaling
    if s.kind == "none":
        return {}
    out = {"factor": s.factor}
    if s.original_max_seq_len:
        out["original_max_position_embeddings"] = s.original_max_seq_len
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        out.update({k: getattr(s, k) for k in ("attention_factor", "mscale", "mscale_all_dim") if getattr(s, k)})
    return out


def _shape_fields(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The ``config.json`` keys every family spells the same way."""
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def llama_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` dict that ``transformers`` reads as ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when
    the model has q/k/v biases) with ``args``' shapes.

    RoPE is given both ways transformers has spelled it (``rope_theta``/``rope_scaling`` up to v4,
    ``rope_parameters`` from v5), so the export loads in either.
    """
    s = args.rope_scaling
    rope_type = "default" if s.kind == "none" else s.kind
    qwen = args.qkv_bias
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        **_shape_fields(args, dtype),
        "head_dim": args.head_dim,
        "rope_scaling": None if s.kind == "none" else {"rope_type": rope_type, **_rope_fields(args)},
        "rope_parameters": {"rope_type": rope_type, "rope_theta": args.rope_theta, **_rope_fields(args)},
    }
    if qwen:
        config["use_sliding_window"] = False
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def internlm2_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` dict in the published InternLM2 form (``auto_map`` to its remote code)."""
    if args.qkv_bias:
        raise ModelDirError("the InternLM2 layout has no q/k/v biases: export this model with family='llama'")
    s = args.rope_scaling
    if s.kind not in ("none", "linear", "dynamic"):
        raise ModelDirError(f"the InternLM2 layout knows linear and dynamic RoPE only, not {s.kind!r}")
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2",
        **_shape_fields(args, dtype),
        "bias": False,
        "rope_scaling": None if s.kind == "none" else {"type": s.kind, "factor": s.factor},
    }


def export_hf(model: Transformer, directory: str | Path, family: str = "llama",
              max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``model`` as a Hugging Face directory: ``family`` ``"llama"`` (Qwen2 when it has q/k/v biases;
    ``transformers`` loads it) or ``"internlm2"`` (the published layout, read back by ``read_model_dir``).
    Weights are safetensors, sharded with an index when over ``max_shard_bytes``."""
    if family not in ("llama", "internlm2"):
        raise ModelDirError(f"export family {family!r}: expected llama or internlm2")
    directory = Path(directory)
    dtype = next(model.parameters()).dtype
    config = llama_config(model.args, dtype) if family == "llama" else internlm2_config(model.args, dtype)
    files = save_model(model, directory, family, max_shard_bytes)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return files + [directory / CONFIG_FILE]


def export_llama(model: Transformer, directory: str | Path, max_shard_bytes: int | None = None) -> list[Path]:
    """``export_hf`` in the Llama layout (what ``transformers`` loads as ``LlamaForCausalLM``)."""
    return export_hf(model, directory, "llama", max_shard_bytes)
