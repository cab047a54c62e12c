"""A short bf16 pretraining run of a ~1B flavor on one GPU, reporting tokens/s and MFU.

What ``scripts/gpu_check.sh`` runs to see that the model, its fused CUDA ops and the training step hold
up at a real size on a real accelerator: the single-device ``Transformer`` (the model every parallel
layout wraps), bf16 autocast over fp32 master weights, fused AdamW, the fused chunked linear +
cross-entropy loss, ``--steps`` timed steps after ``--warmup`` untimed ones.

MFU counts model FLOPs only, as PaLM and Megatron do (``puyu.parallel.metrics.flops_per_token``, the
formula the pretraining job logs): ``6 N`` per token for the weights that multiply (every parameter but
the input embedding table) plus ``12 L d T`` for attention, over the device's dense bf16 peak
(``--peak-tflops``: 989 for H100/H200 SXM). Token ids are drawn at random: a step's FLOPs and time do
not depend on which tokens they are.

    .venv/bin/python scripts/pretrain_mfu.py [--flavor 1b] [--seq-len 2048] [--batch 8] [--steps 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from puyu.model import Transformer, get_flavor
from puyu.parallel.metrics import flops_per_token

FLAVORS = {"1b": ("1_8b", {"n_layers": 12}), "tiny": ("tiny", {})}  # 1b: 1_8b's width at half its depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="1b", choices=sorted(FLAVORS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--no-fused-ops", action="store_true", help="PyTorch reference ops instead of puyu's kernels")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one step and print its N most expensive device kernels")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pretrain_mfu: --device cuda but CUDA is not available here")
    name, overrides = FLAVORS[a.flavor]
    args = get_flavor(name, max_seq_len=max(a.seq_len, 512), **overrides)
    if a.no_fused_ops:
        args = args.replace(fused_ops=False)
    device = torch.device(a.device)
    torch.manual_seed(0)
    with device:
        model = Transformer(args)
    if a.compile:
        for block in model.layers:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, args.vocab_size, (a.steps + a.warmup, a.batch, a.seq_len + 1), device=device)

    def step(batch: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # one host sync per step, as a training loop logging its loss has

    for i in range(a.warmup):
        step(tokens[i])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step(tokens[a.warmup + i]) for i in range(a.steps)]
    seconds = time.perf_counter() - t0
    tok_s = a.steps * a.batch * a.seq_len / seconds
    mfu = tok_s * flops_per_token(args, a.seq_len) / (a.peak_tflops * 1e12)
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"flavor {a.flavor}: {args.num_params() / 1e9:.2f}B parameters, {a.batch} x {a.seq_len} tokens a step, "
          f"bf16 autocast on {device}{mem}; losses {[round(x, 3) for x in losses]}")
    print(f"pretrain {a.flavor} bf16: {tok_s:.0f} tokens/s, MFU {mfu:.1%} of {a.peak_tflops:.0f} TFLOP/s")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(tokens[-1])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=a.profile, max_name_column_width=70))


if __name__ == "__main__":
    main()
