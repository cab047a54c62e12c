"""safetensors checkpoints: single-file or sharded with a Hugging Face index, in any layout, (Hugging Face model directories, with their ``config.json``, are read
and written by :mod:`puyu.model.hf`).

Directory format (the one HF uses, so either side can read the other's output):
- ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
  (``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``);
Loading validates the whole state dict before touching the model and fails once, naming every
missing, unexpected or mis-shaped tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from puyu.model.model import Transformer
from puyu.model.state_dict import Tensors, check_state_dict, convert, expected_shapes, puyu_state_dict

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def save_safetensors(state: Tensors, directory: str | Path, max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``state`` to ``directory``; shards of at most ``max_shard_bytes`` (tensors are never split)
    with an index when the total is larger, else one file. Returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, directory / SINGLE_FILE, metadata={"format": "pt"})
        return [directory / SINGLE_FILE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        files.append(directory / fname)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [directory / INDEX_FILE]


def load_safetensors(path: str | Path) -> Tensors:
    """Read a ``.safetensors`` file, or a directory holding one file or an index with its shards."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        state: Tensors = {}
        for fname in sorted(set(weight_map.values())):
            state.update(load_file(path / fname))
        listed, found = set(weight_map), set(state)
        if listed != found:
            raise ValueError(
                f"{path / INDEX_FILE} disagrees with its shards: listed but absent {sorted(listed - found)}, "
                f"present but unlisted {sorted(found - listed)}"
            )
        return state
    if (path / SINGLE_FILE).exists():
        return load_file(path / SINGLE_FILE)
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def load_model(model: Transformer, path: str | Path, layout: str = "puyu") -> Transformer:
    """Load a checkpoint in ``layout`` (puyu, internlm2 or llama) into ``model``, validating it first."""
    state = convert(load_safetensors(path), layout, "puyu", model.args)
    check_state_dict(state, expected_shapes(model.args), what=f"{layout} checkpoint {path}")
    if model.args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True)
    return model


def save_model(
    model: Transformer, directory: str | Path, layout: str = "puyu", max_shard_bytes: int | None = None
) -> list[Path]:
    """Save ``model``'s weights in ``layout`` (puyu, internlm2 or llama) as safetensors."""
    return save_safetensors(convert(puyu_state_dict(model), "puyu", layout, model.args), directory, max_shard_bytes)
