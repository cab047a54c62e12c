"""Attention over packed documents: puyu's per-document bucketed SDPA vs SDPA with the dense mask.

Packed rows of documents (SFT conversations) need each token to attend only within its document. The
peer is what puyu did before and what most SFT loops do: ``F.scaled_dot_product_attention`` with a
[B, 1, T, T] boolean document-causal mask. Same q/k/v (16 query / 4 KV heads of 64, fp32), same documents
(random lengths 1-70 tokens at T=256, three times longer from T=2048), forward + backward, mean of 3 after
one warm-up, at the row lengths a user runs.

    .venv/bin/python benchmarks/bench_document_attention.py [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from puyu.model.document_attention import DocumentAttention


def documents(B: int, T: int, mean_scale: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(B):
        ids, doc = [], 0
        while len(ids) < T:
            ids += [doc] * (int(torch.randint(1, 71, (1,), generator=gen)) * mean_scale)
            doc += 1
        rows.append(ids[:T])
    return torch.tensor(rows)


def dense_mask(doc: torch.Tensor) -> torch.Tensor:
    T = doc.shape[1]
    return ((doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]


def seconds(fn, repeats: int = 3) -> float:
    fn().sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        fn().sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {a.threads} threads, fp32, 16/4 heads of 64, forward + backward")
    ratio = 0.0
    for B, T in ((8, 256), (4, 2048), (1, 8192)):
        doc = documents(B, T, 1 if T < 2048 else 3, gen)
        q = torch.randn(B, 16, T, 64, requires_grad=True)
        k, v = (torch.randn(B, 4, T, 64, requires_grad=True) for _ in range(2))
        dense = seconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc), enable_gqa=True))
        ours = seconds(lambda: DocumentAttention(doc).attend(q, k, v, enable_gqa=True))
        ratio = dense / ours
        print(f"B={B} T={T} ({int(doc.max(1).values.sum()) + B} documents): dense mask {dense * 1e3:.0f} ms, "
              f"per-document {ours * 1e3:.0f} ms, {ratio:.2f}x")
    print(f"document attention fwd+bwd at T=8192: {ratio:.2f}x vs SDPA with a dense mask (goal 1x)")


if __name__ == "__main__":
    main()
