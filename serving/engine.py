"""Engine directories: checkpoint -> inference layout, and the manifest that guards loading.

An engine directory holds:
- ``engine.json``: format version, the ``ModelArgs``, the build settings and where the weights came from;
- ``weights.safetensors``: per layer ``wqkv`` (query heads, then keys, then values: one matmul and a
  split, instead of InternLM2's per-group interleave), ``w13`` (gate and up stacked: one tensor, so one
  AWQ scale and one quantization pass cover both; the runtime splits it back into two linears whose
  outputs SwiGLU reads without copies), ``wo``, ``w2``, the norms; ``rope.cos``/``rope.sin`` [max_seq_len, head_dim/2] tables;
  quantized linears as described in :mod:`puyu.serving.quant`;
- ``manifest.json``: shape, dtype and sha256 of every tensor and of every other file;
- optionally ``tokenizer.json``, and ``build_report.{json,md}``.
Loading recomputes every checksum and refuses an engine whose bytes or shapes do not match, naming the
tensor or file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from puyu.launcher.atomic import atomic_write_text
from puyu.model import ModelArgs, args_from_hf_config, convert, get_flavor, load_safetensors
from puyu.model.rope import rope_cos_sin
from puyu.model.state_dict import check_state_dict, expected_shapes
from puyu.serving.config import ServingError

FORMAT = "puyu-engine"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, TOKENIZER_FILE = "engine.json", "weights.safetensors", "manifest.json", "tokenizer.json"
Tensors = dict[str, torch.Tensor]


# ---- checkpoints ------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, layout: str = "auto", flavor: str = "tiny", vocab_size: int = 0,
                    fused_ops: bool = True) -> tuple[ModelArgs, Tensors]:
    """``ModelArgs`` and the puyu-layout state dict of a puyu or HF (InternLM2/Llama) checkpoint directory.

    HF checkpoints carry their shapes in ``config.json``; a puyu export has none, so the shapes come from
    ``flavor`` with the vocabulary and layer count read off the tensors.
    """
    path = Path(path)
    hf_config = path / "config.json"
    if layout == "auto":
        layout = json.loads(hf_config.read_text()).get("model_type", "llama") if hf_config.exists() else "puyu"
    if layout not in ("puyu", "internlm2", "llama"):
        raise ServingError(f"checkpoint {path}: unknown layout {layout!r}; expected puyu, internlm2 or llama")
    raw = load_safetensors(path)
    if layout == "puyu":
        emb = raw.get("tok_embeddings.weight")
        if emb is None:
            raise ServingError(f"checkpoint {path}: no tensor tok_embeddings.weight (is it a puyu export?)")
        n_layers = 1 + max(int(k.split(".")[1]) for k in raw if k.startswith("layers."))
        args = get_flavor(flavor, vocab_size=vocab_size or emb.shape[0], n_layers=n_layers, fused_ops=fused_ops,
                          tie_embeddings="output.weight" not in raw)
    else:
        args = args_from_hf_config(json.loads(hf_config.read_text()), fused_ops=fused_ops)
    state = convert(raw, layout, "puyu", args)
    check_state_dict(state, expected_shapes(args), what=f"{layout} checkpoint {path}")
    return args, state


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim/2] fp32: exactly what ``rope_cos_sin`` gives for those positions."""
    cos, sin = rope_cos_sin(args, torch.arange(args.max_seq_len)[None])
    return cos[0].contiguous(), sin[0].contiguous()


def engine_tensors(args: ModelArgs, state: Tensors, dtype: torch.dtype = torch.float32) -> Tensors:
    """puyu state dict -> the engine's unquantized inference layout (see the module docstring)."""
    hd, D, g = args.head_dim, args.dim, args.n_groups
    out: Tensors = {"tok_embeddings.weight": state["tok_embeddings.weight"], "norm.weight": state["norm.weight"]}
    if not args.tie_embeddings:
        out["output.weight"] = state["output.weight"]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        w = state[p + "attention.wqkv.weight"].view(args.n_kv_heads, g + 2, hd, D)  # grouped InternLM2 order
        out[p + "wqkv.weight"] = torch.cat([w[:, :g].reshape(-1, D), w[:, g].reshape(-1, D), w[:, g + 1].reshape(-1, D)])
        out[p + "w13.weight"] = torch.cat([state[p + "feed_forward.w1.weight"], state[p + "feed_forward.w3.weight"]])
        out[p + "wo.weight"] = state[p + "attention.wo.weight"]
        out[p + "w2.weight"] = state[p + "feed_forward.w2.weight"]
        out[p + "attention_norm.weight"] = state[p + "attention_norm.weight"]
        out[p + "ffn_norm.weight"] = state[p + "ffn_norm.weight"]
    out = {k: v.to(dtype).contiguous() for k, v in out.items()}
    out["rope.cos"], out["rope.sin"] = rope_tables(args)
    return out


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
                tokenizer: Optional[str | Path] = None) -> Path:
    """Write an engine directory; the manifest is written last, so its presence means the engine is whole."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS_FILE)
    config = {"format": FORMAT, "version": VERSION, "model_args": args_to_dict(args), "build": build, "source": source}
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = [CONFIG_FILE]
    if tokenizer:
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
        files.append(TOKENIZER_FILE)
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
        p = self.path / TOKENIZER_FILE
        return p if p.exists() else None


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
