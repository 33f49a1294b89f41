"""Small CPU calls on one thread, large ones on all, in eager mode and in a compiled decode step.

With OpenMP's passive waiting (which a shared machine needs) waking the other threads can cost more than
they save on a decode step's small calls: the weight-only kernels on weights up to about 1 MB, attention
over a small KV cache, and every element-wise kernel (`benchmarks/decode_threads.py`, docs/runtime.md).
Whether it does depends on the CPU: on an AVX-512 EPYC one thread won every such call, on an AVX2 one
(whose int4 kernel is 2-3x slower per call) two threads won most. So the choice is measured, not
assumed: the first time a process makes a small call of a kind (`call_small`, keyed by its shapes), it
times it a few times on one thread and on all, and keeps the faster. A compiled decode step
(`llmopt.compiled`) runs on one thread as a whole (`single_threaded`), and its few large calls (a big
output head, attention over a long cache) switch to every thread inside custom operators: torch.compile
cannot trace a change of the thread count, but keeps such an operator as one opaque call.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Hashable, Iterator

import torch
import torch.nn.functional as F

_all_threads: int | None = None        # the thread count outside `single_threaded`, while inside it
_faster_alone: dict[Hashable, bool] = {}   # per kind of small call: measured faster on one thread than on all
_TIMED_REPEATS = 11


def on_one_thread(fn: Callable, *args):
    """Call fn on one CPU thread, restoring the thread count after."""
    return _on_threads(1, fn, *args)


def on_all_threads(fn: Callable, *args):
    """Call fn on every thread the process had before `single_threaded` (as it is, outside of it)."""
    return fn(*args) if _all_threads is None else _on_threads(_all_threads, fn, *args)


def _on_threads(n: int, fn: Callable, *args):
    threads = torch.get_num_threads()
    if threads == n:
        return fn(*args)
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def call_small(key: Hashable, fn: Callable, *args):
    """fn(*args) (pure: it may be called more than once) on one thread or on all, whichever ran this kind
    of call (`key`) faster when this process first made it."""
    alone = _faster_alone.get(key)
    if alone is None:
        alone = _faster_alone[key] = _measure(fn, args)
    return on_one_thread(fn, *args) if alone else fn(*args)


def faster_alone(key: Hashable) -> bool | None:
    """What `call_small` measured for `key`; None before it did."""
    return _faster_alone.get(key)


def mostly_faster_alone() -> bool:
    """Most kinds of small call measured so far ran faster on one thread (True when none was measured)."""
    alone = sum(_faster_alone.values())
    return 2 * alone >= len(_faster_alone)


def _measure(fn: Callable, args: tuple) -> bool:
    """Time fn on one thread and on all, interleaved (the order alternating), each followed by one call on
    all threads: going back to all threads costs the next parallel call a resize of OpenMP's thread team,
    which timing fn alone misses (it chose one thread for SmolLM2's fused q/k/v and o on an AVX2 CPU where
    all threads were 2 ms a step faster). Is one thread's median the lower?"""
    threads = torch.get_num_threads()
    times: dict[int, list[float]] = {1: [], threads: []}
    for i in range(_TIMED_REPEATS + 1):
        for n in (1, threads) if i % 2 else (threads, 1):
            start = time.perf_counter()
            _on_threads(n, fn, *args)
            fn(*args)
            if i:                                 # the first round is untimed
                times[n].append(time.perf_counter() - start)
    return statistics.median(times[1]) < statistics.median(times[threads])


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block on one thread; `on_all_threads` calls inside it get the threads back."""
    global _all_threads
    outer, threads = _all_threads, torch.get_num_threads()
    _all_threads = threads if outer is None else outer
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _all_threads = outer


@torch.library.custom_op("llmopt::int4_mm_all_threads", mutates_args=())
def int4_mm(x: torch.Tensor, w: torch.Tensor, group: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """`aten._weight_int4pack_mm_for_cpu` on all threads (x bf16 [M, K], w packed [N, K/2])."""
    return on_all_threads(torch.ops.aten._weight_int4pack_mm_for_cpu, x, w, group, scales_zeros)


@int4_mm.register_fake
def _(x, w, group, scales_zeros):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("llmopt::int8_mm_all_threads", mutates_args=())
def int8_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`aten._weight_int8pack_mm` on all threads (x bf16 [M, K], w int8 [N, K])."""
    return on_all_threads(torch.ops.aten._weight_int8pack_mm, x, w, scales)


@int8_mm.register_fake
def _(x, w, scales):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("llmopt::sdpa_all_threads", mutates_args=())
def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
         scale: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (no dropout, not causal: a decode step's mask says it all) on all
    threads."""
    return on_all_threads(lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale))


@sdpa.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])
