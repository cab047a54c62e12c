"""Cached CPU allocations for the runtime's step loop.

Every step of ``LLM.generate`` allocates the same activations again (hidden states, QKV, the FFN's
[N, ffn] pair, logits). torch's default CPU allocator passes them to malloc, which serves blocks of that
size with fresh mmaps or trims them off the heap when they are freed, so each step writes into new
pages that the kernel faults in and zeroes: ~57k minor faults (~0.1 s of system time) in a run of the
serving benchmark. Within ``cached_cpu_allocations`` the serving extension's caching allocator
(``csrc/serving/caching_allocator.cpp``) keeps freed blocks of 64 KiB and more and hands them out again;
on exit torch's previous allocator is back and the cache is freed.

It is process-wide while active (other threads' allocations are cached too) and counted, so runtimes
in several threads share one installation. Without the compiled extension it does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from puyu.serving import ops


@contextlib.contextmanager
def cached_cpu_allocations(limit_mb: int) -> Iterator[bool]:
    """Caches freed CPU blocks (at most ``limit_mb`` MiB) inside the block; yields whether it is active
    (False when ``limit_mb`` is 0, the extension is missing, or another allocator outranks it)."""
    ext = ops.extension()  # None unless it imported and suits this CPU
    active = limit_mb > 0 and ext is not None and ext.caching_allocator_enable(limit_mb << 20)
    try:
        yield active
    finally:
        if active:
            ext.caching_allocator_disable()
