"""Engine directories: checkpoint -> inference layout, and the manifest that guards loading.

An engine directory holds:
- ``engine.json``: format version, the ``ModelArgs``, the build settings, where the weights came from and
  (built with a tokenizer) the held-out perplexity before and after quantization;
- ``weights.safetensors``: per layer ``wqkv`` (query heads, then keys, then values: one matmul and a
  split, instead of InternLM2's per-group interleave; ``wqkv.bias`` in the same order for Qwen2), ``w13`` (gate and up stacked: one tensor, so one
  AWQ scale and one quantization pass cover both; the runtime splits it back into two linears whose
  outputs SwiGLU reads without copies), ``wo``, ``w2``, the norms; ``rope.cos``/``rope.sin`` [max_seq_len, head_dim/2] tables;
  quantized linears as described in :mod:`puyu.serving.quant`;
- ``manifest.json``: shape, dtype and sha256 of every tensor and of every other file;
- optionally the tokenizer's files (``puyu.model.hf.TOKENIZER_FILES``: puyu's ``tokenizer.json``, or a Hugging Face
  model's tokenizer, config and chat template), and ``build_report.{json,md}``.
Loading recomputes every checksum and refuses an engine whose bytes or shapes do not match, naming the
tensor or file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from puyu.launcher.atomic import atomic_write_text
from puyu.model import ModelArgs, is_hf_model_dir, read_model_dir
from puyu.model.hf import FAMILIES, copy_tokenizer_files, has_tokenizer, read_hf_config
from puyu.model.state_dict import split_qkv
from puyu.model.rope import rope_cos_sin
from puyu.serving.config import ServingError

FORMAT = "puyu-engine"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE = "engine.json", "weights.safetensors", "manifest.json"
Tensors = dict[str, torch.Tensor]


# ---- checkpoints ------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, layout: str = "auto", flavor: str = "tiny", vocab_size: int = 0,
                    fused_ops: bool = True) -> tuple[ModelArgs, Tensors]:
    """``ModelArgs`` and the puyu-layout state dict of a model directory, through the one loader
    (:func:`puyu.model.read_model_dir`: an HF Llama/Qwen2/InternLM2 directory, or a puyu export whose
    shapes come from ``flavor``). ``layout`` other than auto must agree with what the directory is."""
    path = Path(path)
    found = "puyu"
    if is_hf_model_dir(path):
        found = FAMILIES.get(read_hf_config(path)["model_type"], "unknown")
    if layout not in ("auto", "puyu", "internlm2", "llama"):
        raise ServingError(f"checkpoint {path}: unknown layout {layout!r}; expected auto, puyu, internlm2 or llama")
    if layout != "auto" and layout != found:
        raise ServingError(f"checkpoint {path}: layout={layout} but the directory holds a {found} checkpoint")
    args, state = read_model_dir(path, fused_ops=fused_ops, flavor=flavor)
    if vocab_size and vocab_size != args.vocab_size:
        raise ServingError(f"checkpoint {path}: vocab_size={vocab_size} but its embeddings have {args.vocab_size} rows")
    return args, state


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim/2] fp32: exactly what ``rope_cos_sin`` gives for those positions."""
    cos, sin = rope_cos_sin(args, torch.arange(args.max_seq_len)[None])
    return cos[0].contiguous(), sin[0].contiguous()


def engine_tensors(args: ModelArgs, state: Tensors, dtype: torch.dtype = torch.float32) -> Tensors:
    """puyu state dict -> the engine's unquantized inference layout (see the module docstring)."""
    out: Tensors = {"tok_embeddings.weight": state["tok_embeddings.weight"], "norm.weight": state["norm.weight"]}
    if not args.tie_embeddings:
        out["output.weight"] = state["output.weight"]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        # grouped InternLM2 order -> q | k | v (the bias, where there is one, the same way)
        out[p + "wqkv.weight"] = torch.cat(split_qkv(args, state[p + "attention.wqkv.weight"]))
        if args.qkv_bias:
            out[p + "wqkv.bias"] = torch.cat(split_qkv(args, state[p + "attention.wqkv.bias"]))
        out[p + "w13.weight"] = torch.cat([state[p + "feed_forward.w1.weight"], state[p + "feed_forward.w3.weight"]])
        out[p + "wo.weight"] = state[p + "attention.wo.weight"]
        out[p + "w2.weight"] = state[p + "feed_forward.w2.weight"]
        out[p + "attention_norm.weight"] = state[p + "attention_norm.weight"]
        out[p + "ffn_norm.weight"] = state[p + "ffn_norm.weight"]
    out = {k: v.to(dtype).contiguous() for k, v in out.items()}
    out["rope.cos"], out["rope.sin"] = rope_tables(args)
    return out


def is_quantized(tensors: Tensors) -> bool:
    return any(k.endswith(".qweight") for k in tensors)


def place_tensors(tensors: Tensors, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> Tensors:
    """Engine tensors on ``device``, the floating ones cast to ``dtype`` (None: kept) except the RoPE
    tables, which stay fp32 as the model's are (the rotation is computed in fp32; bf16 tables would cut
    every cos/sin to 3 digits); quantized codes keep their integer types. Tensors already there in that
    dtype are the same objects (no copy)."""
    def cast(name: str, t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() and not name.startswith("rope.") else t.dtype

    return {k: v.to(device, cast(k, v)) for k, v in tensors.items()}


# ---- manifest ---------------------------------------------------------------------------------------
def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def args_to_dict(args: ModelArgs) -> dict:
    return dataclasses.asdict(args)


def args_from_dict(d: dict) -> ModelArgs:
    return ModelArgs(**d)


def save_engine(out_dir: str | Path, args: ModelArgs, tensors: Tensors, build: dict, source: dict,
                tokenizer: Optional[str | Path] = None, quality: Optional[dict] = None) -> Path:
    """Write an engine directory; the manifest is written last, so its presence means the engine is whole.
    ``quality`` (held-out perplexity before and after quantization) goes into ``engine.json`` beside the
    build settings, so the checksummed engine itself says what quantization cost."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS_FILE)
    config = {"format": FORMAT, "version": VERSION, "model_args": args_to_dict(args), "build": build, "source": source}
    if quality:
        config["quality"] = quality
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = [CONFIG_FILE]
    if tokenizer:
        files += copy_tokenizer_files(tokenizer, out)
    manifest = {
        "format": FORMAT,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": tensor_sha256(v)}
                    for k, v in sorted(tensors.items())},
        "files": {f: file_sha256(out / f) for f in files},
    }
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


@dataclasses.dataclass
class Engine:
    path: Path
    args: ModelArgs
    tensors: Tensors
    config: dict[str, Any]

    @property
    def tokenizer_path(self) -> Optional[Path]:
        """The directory holding the engine's tokenizer files (an engine dir or the model dir), or None."""
        return self.path if has_tokenizer(self.path) else None


def is_engine_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def engine_from_model_dir(path: str | Path, fused_ops: bool = True, dtype: Optional[torch.dtype] = None) -> Engine:
    """An unquantized in-memory engine straight from a model directory (HF or puyu export), so every job
    that serves a model (``infer``, ``eval``, ``agent``) takes what the user has without a build step.
    ``dtype``: the weights' (default: the checkpoint's own floating dtype)."""
    args, state = read_model_dir(path, fused_ops=fused_ops)
    dtype = dtype or state["tok_embeddings.weight"].dtype
    config = {"format": "model-dir", "build": {"quant": "none", "kv": "fp"}, "source": {"checkpoint": str(path)}}
    return Engine(Path(path), args, engine_tensors(args, state, dtype), config)


def open_engine(path: str | Path, fused_ops: Optional[bool] = None) -> Engine:
    """An engine directory (verified against its manifest) or, failing that, a model directory."""
    path = Path(path)
    if is_engine_dir(path) or not path.is_dir():
        return load_engine(path, fused_ops)
    if not is_hf_model_dir(path) and not any(path.glob("*.safetensors")):
        raise ServingError(f"{path}: neither an engine (no {MANIFEST_FILE}) nor a model directory (no config.json "
                           "or safetensors)")
    return engine_from_model_dir(path, True if fused_ops is None else fused_ops)


def weights_fingerprint(path: str | Path) -> str:
    """A sha256 naming the weights a predictions file was made with: an engine's manifest (which holds
    every tensor's checksum), or for a model directory its config and each file's name, size and mtime
    (hashing a 7B model's bytes per task would cost more than the evaluation it guards)."""
    path = Path(path)
    if is_engine_dir(path):
        return file_sha256(path / MANIFEST_FILE)
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if f.name == "config.json":
            h.update(f.read_bytes())
    return h.hexdigest()


def load_engine(path: str | Path, fused_ops: Optional[bool] = None) -> Engine:
    """Read an engine directory, verifying every tensor and file against the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise ServingError(f"engine {path}: no {MANIFEST_FILE} (not an engine, or its build did not finish)")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        if not (path / name).exists() or file_sha256(path / name) != digest:
            raise ServingError(f"engine {path}: file {name} is missing or does not match its manifest checksum")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ServingError(f"engine {path}: {CONFIG_FILE} is not a {FORMAT} v{VERSION} config")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as exc:
        raise ServingError(f"engine {path}: cannot read {WEIGHTS_FILE}: {exc}") from None
    listed, found = set(manifest["tensors"]), set(tensors)
    if listed != found:
        raise ServingError(f"engine {path}: tensors missing {sorted(listed - found)}, unlisted {sorted(found - listed)}")
    for name, meta in sorted(manifest["tensors"].items()):
        t = tensors[name]
        if list(t.shape) != meta["shape"] or str(t.dtype).removeprefix("torch.") != meta["dtype"]:
            raise ServingError(f"engine {path}: tensor {name} is {tuple(t.shape)} {t.dtype}, manifest says "
                               f"{tuple(meta['shape'])} {meta['dtype']}")
        if tensor_sha256(t) != meta["sha256"]:
            raise ServingError(f"engine {path}: tensor {name} does not match its manifest checksum (corrupt)")
    args = args_from_dict(config["model_args"])
    if fused_ops is not None:
        args = args.replace(fused_ops=fused_ops)
    check_engine_shapes(path, args, tensors)
    return Engine(path, args, tensors, config)


def check_engine_shapes(path: Path, args: ModelArgs, tensors: Tensors) -> None:
    """The tensors must have the shapes ``engine.json``'s model args imply (catches mixed-up engines)."""
    hd, D, F = args.head_dim, args.dim, args.ffn_hidden_dim
    expected = {"tok_embeddings.weight": (args.vocab_size, D), "norm.weight": (D,),
                "rope.cos": (args.max_seq_len, hd // 2), "rope.sin": (args.max_seq_len, hd // 2)}
    shapes = {"wqkv": ((args.n_heads + 2 * args.n_kv_heads) * hd, D), "wo": (D, args.n_heads * hd),
              "w13": (2 * F, D), "w2": (D, F)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        expected[p + "attention_norm.weight"] = expected[p + "ffn_norm.weight"] = (D,)
        if args.qkv_bias:
            expected[p + "wqkv.bias"] = ((args.n_heads + 2 * args.n_kv_heads) * hd,)
        for name, (n_rows, n_cols) in shapes.items():
            if p + name + ".weight" in tensors:
                expected[p + name + ".weight"] = (n_rows, n_cols)
            elif p + name + ".qweight" in tensors:  # packed columns: only the rows are checked here
                expected[p + name + ".qweight"] = (n_rows, *tensors[p + name + ".qweight"].shape[1:])
            else:
                raise ServingError(f"engine {path}: tensor {p + name}.weight (or .qweight) missing")
    for name, shape in expected.items():
        if name not in tensors:
            raise ServingError(f"engine {path}: tensor {name} missing")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ServingError(f"engine {path}: tensor {name} is {tuple(tensors[name].shape)}, the model args "
                               f"in {CONFIG_FILE} imply {tuple(shape)}")
