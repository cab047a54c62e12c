"""Build the model on the meta device, shard it, then materialise only this rank's shards.

A rank never holds the whole model: ``Transformer(args)`` is built under ``torch.device("meta")``
(shapes only, no storage), :func:`puyu.parallel.parallelize.parallelize` splits and shards it
(DTensor TP, FSDP2's ``fully_shard``, both work on meta parameters), and :func:`materialize`
gives each parameter storage for its local shard only (``to_empty``) and fills it, one parameter
at a time, from the parameter's full value: a seeded initialisation (:func:`seeded_init`), a base
checkpoint read tensor by tensor (finetuning), or nothing when a DCP checkpoint is loaded next
(resume). The extra memory is one full parameter at a time (the embedding, at most).

Deterministic, layout-independent initialisation. Each parameter's full value is drawn from the
default generator of the target device seeded by ``(seed, parameter name)``, with
``puyu.model.model.init_parameter``'s rule for that name; :func:`torch.distributed.tensor.distribute_tensor`
with ``src_data_rank=None`` then keeps this rank's slice without communicating. So every layout
(TP/PP/FSDP/HSDP, any world size) and the single process start from bitwise the same weights on a
given device type, and pretraining's parity tests still compare loss curves from one seed. The
price: a rank draws the full random values of every parameter it holds (about 0.5 s per 10^8 values
on one CPU core; far less on a GPU) and keeps a fraction. What was rejected:

- torchtitan's way (``to_empty`` then ``init_weights`` on the sharded DTensors under one seed):
  on CPU the DTensor random ops draw every rank's shard from the same generator state, so all
  ``dp`` shards of a matrix come out identical (measured: rank 0 and rank 1 got the same rows); on
  CUDA the offset-based RNG avoids that, but the values then depend on the layout, and no layout
  could be compared with another from a seed;
- one global random stream over the whole model (what ``torch.manual_seed(seed); Transformer(args)``
  did before): reproducing it needs every rank to draw every parameter of the model in order,
  pipeline stages it does not hold included, and depends on the construction order of modules.
So the weights differ from that older single-device initialisation (same distribution).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from puyu.model import ModelArgs, Transformer
from puyu.model.model import init_parameter

# A parameter's full value from its name (single-device, puyu layout) and its (meta or sharded)
# parameter, whose ``shape``/``dtype``/``device`` are those of the full tensor wanted.
FullValue = Callable[[str, torch.Tensor], torch.Tensor]
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, torch.compile


def meta_model(args: ModelArgs) -> Transformer:
    """The model with shapes only: no storage is allocated and its init draws no random numbers."""
    with torch.device("meta"):
        return Transformer(args)


def single_device_name(name: str, args: ModelArgs) -> str:
    """The parameter's name in the single-device model: without the AC/compile wrappers' prefixes, and
    the tied head named as the embedding it shares (pipeline stages hold them on different ranks)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    if args.tie_embeddings and name == "output.weight":
        return "tok_embeddings.weight"
    return name


def named_parameters(parts: list[nn.Module], args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's parameters under their single-device names, each tensor once."""
    seen: set[int] = set()
    for part in parts:
        for name, p in part.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield single_device_name(name, args), p


def local_shard(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (the whole parameter) that ``p`` (plain or DTensor) holds on this rank."""
    if isinstance(p, DTensor):
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return full


def _to_empty(part: nn.Module, device: torch.device) -> None:
    """``to_empty`` that keeps shared parameters shared (plain modules lose a tie: one new tensor per
    module; FSDP2 keeps it itself)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in part.modules():
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            places.setdefault(id(p), []).append((module, name))
    part.to_empty(device=device)
    for (owner, owner_name), *others in places.values():
        for module, name in others:
            setattr(module, name, getattr(owner, owner_name))


@torch.no_grad()
def materialize(parts: list[nn.Module], args: ModelArgs, device: torch.device,
                full_value: Optional[FullValue]) -> None:
    """Give the meta parts storage on ``device`` for their local shards; fill each from ``full_value``
    (``None``: leave them uninitialised, for a checkpoint load that writes every parameter)."""
    for part in parts:
        buffers = [name for name, _ in part.named_buffers()]
        if buffers:  # to_empty would leave them as garbage and no rule here says what they hold
            raise NotImplementedError(f"materialize: the model has buffers {buffers}; fill them after to_empty")
        _to_empty(part, device)
    if full_value is None:
        return
    for name, p in named_parameters(parts, args):
        local = p.to_local() if isinstance(p, DTensor) else p
        shard = local_shard(full_value(name, p).to(device=device, dtype=p.dtype), p)
        if shard.shape != local.shape:
            raise ValueError(f"{name}: the local shard of the full value is {tuple(shard.shape)}, "
                             f"the parameter's is {tuple(local.shape)}")
        local.copy_(shard)


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run's seed and a parameter name (stable across processes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def seeded_full(seed: int, name: str, like: torch.Tensor, init: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """A new tensor of ``like``'s full shape, dtype and device filled by ``init`` under the device's
    generator seeded by ``(seed, name)``; the caller's random state is left as it was."""
    full = torch.empty(like.shape, dtype=like.dtype, device=like.device)  # [global shape]
    with torch.random.fork_rng(devices=[full.device] if full.device.type == "cuda" else []):
        torch.manual_seed(param_seed(seed, name))
        init(full)
    return full


def seeded_init(args: ModelArgs, seed: int) -> FullValue:
    """Full values drawn per parameter name with ``init_parameter``'s rule."""

    def full_value(name: str, p: torch.Tensor) -> torch.Tensor:
        return seeded_full(seed, name, p, lambda full: init_parameter(args, name, full))

    return full_value
