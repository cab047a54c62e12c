"""A tokenizer and a briefly trained tiny model on real text, for serving tests and the benchmark.

Quantization error only means something on a model whose weights have structure (a random model's
perplexity is ~vocab size whatever one does to it), so tests train the ``tiny`` flavor for a few hundred
steps on Wikipedia lead sections in-process: seconds on CPU, with the same training loss as pretraining.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from puyu.data_pipeline.corpora import wiki_summaries_file, wiki_titles
from puyu.data_pipeline.tokenize import train_tokenizer
from puyu.model import Transformer, get_flavor
from puyu.serving.tokenizer import TextTokenizer


def wiki_texts() -> list[str]:
    data = json.loads(wiki_summaries_file().read_text())
    return [data[title]["extract"] for title in wiki_titles(data)]


def make_tokenizer(texts: list[str], path: Path, vocab_size: int = 2000) -> TextTokenizer:
    train_tokenizer(texts, vocab_size, 2, path)
    return TextTokenizer(path)


def train_tiny(texts: list[str], tokenizer: TextTokenizer, steps: int = 300, seq_len: int = 128, batch: int = 16,
               seed: int = 0, lr: float = 3e-3, model: Transformer | None = None) -> Transformer:
    """The tiny flavor (vocabulary of ``tokenizer``) trained on ``texts`` packed into ``seq_len`` windows
    (``model``: go on training that one, in place, instead of a fresh one)."""
    torch.manual_seed(seed)
    vocab = tokenizer.tok.get_vocab_size()
    model = model if model is not None else Transformer(get_flavor("tiny", vocab_size=vocab))
    model.train()
    stream = []
    for t in texts:
        stream += tokenizer.encode(t) + [tokenizer.eos_id]
        if len(stream) > steps * batch * seq_len // 4:  # enough windows for a few passes
            break
    data = torch.tensor(stream[: len(stream) // (seq_len + 1) * (seq_len + 1)]).view(-1, seq_len + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        loss = model.loss(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
