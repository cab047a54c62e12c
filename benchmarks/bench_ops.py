"""Fused ops vs their PyTorch references on CPU: forward+backward time per op, the peak memory of
the cross-entropy at InternLM2's vocabulary (92544), and the forward time of paged decode attention
(inference only, ``puyu.serving.ops``) against its reference's gather + matmuls.

    .venv/bin/python benchmarks/bench_ops.py [--repeat 7]

Times are medians over ``--repeat`` runs, fused and reference interleaved so that load from other
processes hits both alike. Peak memory is the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over its RSS before one forward+backward, each variant in a fresh subprocess.
Paged decode attention runs at the serving benchmark's shapes (and a larger model's) with the process's
threads, and its serving shape once more at 1 thread.
The last line is the slowest fwd+bwd op's speed-up, ``<what>: <ratio>x vs <peer> (goal <goal>x)``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from puyu.model import ops
from puyu.serving import ops as serving_ops

SPEED_GOAL, MEMORY_GOAL = 1.5, 0.25
VOCAB, CE_TOKENS, CE_DIM = 92544, 1024, 256
PAGED_SPEED_GOAL = 3.0  # paged decode attention, forward only, vs the reference's gather + matmuls


def interleaved_times(runs: list[tuple[str, Callable[[], object]]], repeat: int) -> dict[str, list[float]]:
    """Wall seconds of each labelled run over ``repeat`` rounds, the runs alternating within a round so a
    change of machine load hits all of them; one warm-up round first, not counted."""
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    for i in range(repeat + 1):
        for label, run in runs:
            start = time.perf_counter()
            run()
            if i:
                times[label].append(time.perf_counter() - start)
    return times


def _fwd_bwd(fn, inputs, grads):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)


def _matmuls_only(h, w):
    """The three matmuls any linear + cross-entropy forward+backward must run: the floor both share."""
    logits = h @ w.T  # [N, V]
    return logits @ w, logits.T @ h


def _cases(dtype):
    """(name, shape, fused fn, reference fn, inputs, floor fn or None) at 1.8b-like shapes."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    angles = torch.rand(4, 1024, 64, generator=g) * 1000
    cos, sin = angles.cos(), angles.sin()
    target = torch.randint(0, VOCAB, (CE_TOKENS,), generator=g)
    yield ("rms_norm", "x [8192, 2048]", lambda x, w: ops.rms_norm(x, w, 1e-5),
           lambda x, w: ops.rms_norm_reference(x, w, 1e-5), [rand(8192, 2048), rand(2048)], None)
    yield ("rope", "q [4, 1024, 16, 128], k [4, 1024, 8, 128]", lambda q, k: ops.apply_rope(q, k, cos, sin),
           lambda q, k: ops.rope_reference(q, k, cos, sin), [rand(4, 1024, 16, 128), rand(4, 1024, 8, 128)], None)
    yield ("swiglu", "gate, up [4096, 8192]", ops.swiglu, ops.swiglu_reference, [rand(4096, 8192), rand(4096, 8192)],
           None)
    if dtype == torch.float32:
        yield ("cross_entropy", f"hidden [{CE_TOKENS}, {CE_DIM}], vocab {VOCAB}",
               lambda h, w: ops.linear_cross_entropy(h, w, target),
               lambda h, w: ops.linear_cross_entropy_reference(h, w, target),
               [rand(CE_TOKENS, CE_DIM) * 0.1, rand(VOCAB, CE_DIM) * 0.1], _matmuls_only)


def time_ops(repeat: int) -> list[float]:
    ratios = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, fused, reference, inputs, floor in _cases(dtype):
            with torch.no_grad():
                outs = reference(*inputs)
            grads = tuple(torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,)))
            runs = [("fused", lambda: _fwd_bwd(fused, inputs, grads)),
                    ("reference", lambda: _fwd_bwd(reference, inputs, grads))]
            if floor is not None:
                runs.append(("floor", lambda: floor(*inputs)))
            times = interleaved_times(runs, repeat)
            f, r = statistics.median(times["fused"]), statistics.median(times["reference"])
            ratios.append(r / f)
            extra = f", the 3 matmuls alone {statistics.median(times['floor']) * 1e3:.1f} ms" if floor else ""
            print(f"{name} {str(dtype).removeprefix('torch.')} {shape}: fused {f * 1e3:.1f} ms, "
                  f"reference {r * 1e3:.1f} ms{extra} -> {r / f:.2f}x (goal {SPEED_GOAL}x)", flush=True)
    return ratios


def _paged_inputs(b, Hq, Hk, d, block_size, min_ctx, max_ctx, kv_int8=False):
    """Decode attention inputs as the serving runtime holds them: a paged cache [Hk, num_blocks, bs, d]
    whose blocks are handed out in shuffled order, block tables padded with 0, contexts min..max_ctx."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(min_ctx, max_ctx + 1, (b,), generator=g)
    max_blocks = -(-max_ctx // block_size)
    num_blocks = b * max_blocks + 1  # block 0: padding
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).view(b, max_blocks)
    tables = torch.where(torch.arange(max_blocks) * block_size < lens[:, None], ids, 0)  # [b, max_blocks]
    q = torch.randn(b, Hq, d, generator=g)
    shape = (Hk, num_blocks, block_size, d)
    if kv_int8:
        k, v = (torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for _ in range(2))
        k_scale, v_scale = (torch.rand(shape[:3], generator=g) / 40 for _ in range(2))
        return q, k, v, tables, lens, d**-0.5, k_scale, v_scale
    return q, torch.randn(shape, generator=g), torch.randn(shape, generator=g), tables, lens, d**-0.5


def time_paged_attention(repeat: int) -> list[float]:
    """Forward time of paged decode attention, fused vs reference; one line per case, ratios returned."""
    serving = (256, 8, 2, 32, 16, 20, 210)  # bench_serving's model and prompts: b, Hq, Hk, d, bs, contexts
    cases = [("fp32", serving, False, None), ("int8 KV", serving, True, None),
             ("fp32", (64, 32, 8, 128, 16, 1, 2048), False, None), ("fp32", serving, False, 1)]
    ratios = []
    default_threads = torch.get_num_threads()
    for kind, shape, kv_int8, threads in cases:
        inputs = _paged_inputs(*shape, kv_int8=kv_int8)
        torch.set_num_threads(threads or default_threads)
        runs = [("fused", lambda: serving_ops.paged_decode_attention(*inputs)),
                ("reference", lambda: serving_ops.paged_decode_attention_reference(*inputs))]
        with torch.no_grad():
            times = interleaved_times(runs, repeat)
        torch.set_num_threads(default_threads)
        f, r = statistics.median(times["fused"]), statistics.median(times["reference"])
        ratios.append(r / f)
        b, Hq, Hk, d, bs, lo, hi = shape
        n = threads or default_threads
        print(f"paged_decode_attention {kind} q [{b}, {Hq}, {d}], Hk {Hk}, block {bs}, contexts {lo}..{hi}, "
              f"{n} thread{'s' * (n > 1)}: fused {f * 1e3:.2f} ms, reference (gather + matmuls) "
              f"{r * 1e3:.2f} ms -> {r / f:.2f}x (goal {PAGED_SPEED_GOAL}x)", flush=True)
    return ratios


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def ce_peak_bytes(variant: str) -> int:
    """(in a fresh process) extra peak RSS of one cross-entropy forward+backward, after a warm-up run."""
    fused = variant == "fused"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(CE_TOKENS, CE_DIM, generator=g) * 0.1
    w = torch.randn(VOCAB, CE_DIM, generator=g) * 0.1
    target = torch.randint(0, VOCAB, (CE_TOKENS,), generator=g)
    fn = ops.linear_cross_entropy if fused else ops.linear_cross_entropy_reference
    grads = (torch.ones(()),)
    _fwd_bwd(lambda h, w: fn(h, w, target), [h, w], grads)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    _fwd_bwd(lambda h, w: fn(h, w, target), [h, w], grads)
    return (_status_kib("VmHWM") - before) * 1024


def measure_ce_memory() -> float:
    peaks = {}
    for variant in ("fused", "reference"):
        out = subprocess.run([sys.executable, __file__, "--ce-peak", variant], capture_output=True, text=True,
                             check=True)
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    ratio = peaks["fused"] / peaks["reference"]
    print(f"cross_entropy peak memory fwd+bwd ({CE_TOKENS} tokens, vocab {VOCAB}, fp32): fused "
          f"{peaks['fused'] / 2**20:.0f} MiB, reference {peaks['reference'] / 2**20:.0f} MiB "
          f"(full fp32 logits alone: {CE_TOKENS * VOCAB * 4 / 2**20:.0f} MiB)")
    print(f"cross_entropy peak memory at vocab {VOCAB}: {ratio:.3f}x vs reference (goal {MEMORY_GOAL}x)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--ce-peak", choices=["fused", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ce_peak:
        print(json.dumps({"peak_bytes": ce_peak_bytes(args.ce_peak)}))
        return
    for name, module in (("fused ops", ops), ("serving ops", serving_ops)):
        if not module.extension_available("cpu"):
            sys.exit(f"the {name} extension is not built ({module.extension_problem()}): "
                     "pip install --no-build-isolation -e . first")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU kernels: {ops._ext.cpu_isa()}")
    ratios = time_ops(args.repeat)
    time_paged_attention(args.repeat)
    measure_ce_memory()
    print(f"fused ops fwd+bwd speed, slowest op: {min(ratios):.2f}x vs PyTorch reference (goal {SPEED_GOAL}x)")


if __name__ == "__main__":
    main()
