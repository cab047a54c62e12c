"""Pretraining batches from the data stage's Megatron ``.bin/.idx`` shards, resumable by sample count.

megatron-core builds the dataset (blending, deterministic shuffling, epochs; documents packed
into rows, EOD-separated, attended causally as in Megatron's default); puyu only decides which global samples a step uses: step ``s`` consumes samples
``[s·G, (s+1)·G)`` of the shuffled dataset (``G`` = global batch), data-parallel rank ``r`` takes
the ``r``-th contiguous slice of it, cut into micro-batches. The whole state is the number of
consumed samples, so a resumed run — in any layout with the same global batch — sees exactly
the batches an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Iterator

import torch

from puyu.launcher.errors import PuyuError
from puyu.parallel.config import PretrainDataConfig



def resolve_prefixes(paths: list[str]) -> list[str]:
    prefixes = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(str(i.with_suffix("")) for i in p.rglob("*.idx"))
            if not found:
                raise PuyuError(f"data path {p} holds no .idx/.bin token shards")
            prefixes += found
        elif p.with_suffix(".idx").exists() and p.with_suffix(".bin").exists():
            prefixes.append(str(p))
        else:
            raise PuyuError(f"data path {p}: neither a folder of shards nor a prefix with {p}.bin and {p}.idx")
    return prefixes


def build_dataset(cfg: PretrainDataConfig, num_samples: int, vocab_size: int):
    """The megatron-core GPTDataset (train split) with at least ``num_samples`` samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = resolve_prefixes(cfg.paths)
    if cfg.weights is not None and len(cfg.weights) != len(prefixes):
        raise PuyuError(f"data.weights has {len(cfg.weights)} entries for {len(prefixes)} shard prefixes")
    # megatron only reads these tokenizer attributes for pre-tokenized data
    tokenizer = types.SimpleNamespace(eod=cfg.eod_token, pad=-1, vocab_size=vocab_size,
                                      unique_identifiers={"class": "puyu-pretokenized", "eod": cfg.eod_token})
    mcfg = GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_len, blend=(prefixes, cfg.weights), split="100,0,0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cfg.cache_dir or str(Path(prefixes[0]).parent / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, mcfg).build()
    return train


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor  # [micro_batch, seq_len] int64; EOD-separated documents, packed
    labels: torch.Tensor  # [micro_batch, seq_len] int64, tokens shifted by one


class StepBatches:
    """Micro-batches of one data-parallel rank, step by step, from ``consumed_samples`` on."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        if global_batch % (micro_batch * dp_size):
            raise PuyuError(f"global batch {global_batch} is not a multiple of micro_batch {micro_batch} × "
                            f"data-parallel size {dp_size}")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next step; advances ``consumed_samples`` by the global batch."""
        per_rank = self.global_batch // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank
        ids = [(first + i) % len(self.dataset) for i in range(per_rank)]
        self.consumed_samples += self.global_batch
        out = []
        for m in range(0, per_rank, self.micro_batch):
            samples = [self.dataset[i] for i in ids[m:m + self.micro_batch]]
            out.append(Batch(*(torch.stack([s[k] for s in samples]) for k in ("tokens", "labels"))))
        return out

    def steps(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()
