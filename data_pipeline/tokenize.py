"""Tokenizer training/loading and Megatron indexed datasets (``.bin`` + ``.idx``).

The tokenizer is a byte-level BPE (``tokenizers``): every byte is in the base alphabet, so any
English, Chinese or binary-ish text encodes without unknown tokens (the byte fallback). The
indexed dataset format is megatron-core's ``MMIDIDX`` version 1, one sequence per document; it
is written here (atomically, deterministically) and read back in tests by megatron-core itself.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from puyu.launcher.atomic import atomic_open, atomic_write_text

EOD = "<|endoftext|>"
# InternLM2's chat and agent markers, one token each as in its tokenizer: a reply that calls a tool then
# opens with one token instead of nine byte pieces (``<|action_start|>`` split as ``<``, ``|``, ``act``...),
# which is what lets a small finetuned model learn the agents' call format from a few hundred traces
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
SPECIAL_TOKENS = [EOD, "<|pad|>", *CHAT_TOKENS]
_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, path: Path) -> Tokenizer:
    """Byte-level BPE trained on ``texts``, saved to ``path`` (tokenizer.json)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    atomic_write_text(path, tok.to_str(pretty=False))
    return tok


def token_ids(tok: Tokenizer, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each text, encoded in batches (``encode_batch_fast``: ids only, no offsets)."""
    pending: list[str] = []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield from (enc.ids for enc in tok.encode_batch_fast(pending))
            pending = []
    if pending:
        yield from (enc.ids for enc in tok.encode_batch_fast(pending))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def write_index(path: Path, lengths: np.ndarray, dtype: np.dtype) -> None:
    """megatron-core's ``.idx``: header, counts, lengths, byte pointers, document boundaries."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
    with atomic_open(path, "wb") as fh:
        fh.write(_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[dtype]))
        fh.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index)))
        fh.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())


def write_indexed_dataset(prefix: Path, token_lists: Iterator[list[int]], dtype: np.dtype) -> dict:
    """Stream documents' token ids into ``prefix.bin``, then write ``prefix.idx``."""
    lengths: list[int] = []
    with atomic_open(prefix.with_suffix(".bin"), "wb") as fh:
        for ids in token_lists:
            fh.write(np.asarray(ids, dtype=dtype).tobytes())
            lengths.append(len(ids))
    write_index(prefix.with_suffix(".idx"), np.array(lengths, dtype=np.int32), dtype)
    return {"documents": len(lengths), "tokens": int(sum(lengths))}


def read_lengths(idx_path: Path) -> tuple[np.ndarray, np.dtype]:
    """Sequence lengths and token dtype of an ``.idx`` this module wrote."""
    data = Path(idx_path).read_bytes()
    if data[:9] != _HEADER:
        raise ValueError(f"{idx_path}: not a Megatron MMIDIDX index")
    code = data[17]
    dtype = next(d for d, c in _DTYPE_CODES.items() if c == code)
    count = struct.unpack_from("<Q", data, 18)[0]
    return np.frombuffer(data, dtype=np.int32, count=count, offset=34).copy(), dtype


def merge_indexed_datasets(prefixes: list[Path], out_prefix: Path) -> dict:
    """Concatenate shard datasets into one (``.bin`` bytes appended in order, index rebuilt)."""
    lengths, dtype = [], None
    with atomic_open(out_prefix.with_suffix(".bin"), "wb") as out:
        for prefix in prefixes:
            part_lengths, part_dtype = read_lengths(prefix.with_suffix(".idx"))
            if dtype is not None and part_dtype != dtype:
                raise ValueError(f"{prefix}: token dtype {part_dtype} differs from {dtype}")
            dtype = part_dtype
            lengths.append(part_lengths)
            with open(prefix.with_suffix(".bin"), "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    all_lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int32)
    write_index(out_prefix.with_suffix(".idx"), all_lengths, dtype or np.dtype(np.uint16))
    return {"documents": int(len(all_lengths)), "tokens": int(all_lengths.sum())}
