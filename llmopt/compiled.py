"""Decode steps through a `torch.compile`d forward over a static KV cache (`llmopt bench --compile`).

At batch 1 a small model's decode step is mostly Python and operator dispatch: thousands of tiny
element-wise calls (norms, rotary embedding, casts) around a few hundred matmuls (docs/runtime.md).
Compiling fuses that element-wise work into a few C++ kernels. Compiled graphs need static shapes, so
the KV cache is transformers' `StaticCache`, sized for the prompt and the new tokens; the prefill runs
eagerly (its shape changes with every prompt) and every decode step through one graph, compiled once
per model, batch and cache length. A step runs on one CPU thread but for its large calls
(`llmopt.one_thread`), or on all where small calls measured faster so (`warm_up`; on an AVX2 CPU,
whose int4 kernel is slow, all threads won); the weight-only kernels and attention stay PyTorch's own.
On CUDA the step is also captured as a CUDA graph (`mode="reduce-overhead"`) and no thread count is chosen.
Compiling costs tens of seconds to minutes of CPU time, which pays off only after thousands of tokens:
`llmopt bench` reports it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from llmopt import one_thread
from llmopt.kv_cache import cache_keyword
from llmopt.models import model_device

_STEP = "_llmopt_compiled_step"
_ALONE = "_llmopt_step_alone"       # chosen by warm_up: the compiled step runs on one thread


def compiled_step(model: torch.nn.Module) -> Callable[..., Any]:
    """The model's compiled forward, made once per model (torch.compile compiles lazily, on first call)."""
    step = getattr(model, _STEP, None)
    if step is None:
        # on CUDA the step is also captured as a CUDA graph: at batch 1 launching its hundreds of kernels one
        # by one from Python costs more than running them (the static cache keeps its addresses fixed)
        cuda = model_device(model).type == "cuda"
        step = torch.compile(model.forward, dynamic=False, mode="reduce-overhead" if cuda else None)
        setattr(model, _STEP, step)
    return step


def static_cache(model: torch.nn.Module, max_len: int):
    """transformers' StaticCache with a full-length layer for every layer, sliding-window ones included:
    its sliding-window layer keeps its length in a Python int, which torch.compile specializes on, so the
    step would be compiled again at every position. The model's sliding-window mask still limits what
    those layers attend to (same logits: tests/test_compiled.py); they read up to max_len cached tokens
    instead of the window."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    cache.layers = [StaticLayer(max_cache_len=max_len) for _ in cache.layers]
    return cache


def prefill(model: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt eagerly into `cache`; the next token (greedy) [batch, 1]."""
    n = ids.shape[1]
    out = model(input_ids=ids, cache_position=torch.arange(n, device=ids.device), use_cache=True, logits_to_keep=1,
                **{cache_keyword(model): cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


def step(model: torch.nn.Module, token: torch.Tensor, cache, position: int) -> torch.Tensor:
    """One compiled decode step at `position`; the next token (greedy) [batch, 1]."""
    return _step(model, token, cache, position, getattr(model, _ALONE, token.device.type == "cpu"))


def _step(model: torch.nn.Module, token: torch.Tensor, cache, position: int, alone: bool,
          compiled: bool = True) -> torch.Tensor:
    forward = compiled_step(model) if compiled else model
    with one_thread.single_threaded() if alone else contextlib.nullcontext():
        out = forward(input_ids=token, use_cache=True, **{cache_keyword(model): cache},
                      cache_position=torch.tensor([position], device=token.device))
    return out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens after prompt [1, len]: the eager prefill, then n - 1 compiled steps."""
    cache = static_cache(model, prompt.shape[1] + n)
    token = prefill(model, prompt, cache)
    tokens = [int(token)]
    for i in range(n - 1):
        token = step(model, token, cache, prompt.shape[1] + i)
        tokens.append(int(token))
    return tokens


@torch.no_grad()
def warm_up(model: torch.nn.Module, prompt: torch.Tensor, gen_len: int) -> float:
    """Compile the decode step for this batch and cache length (prompt + gen_len) by running it; the wall
    time in seconds, almost all of it compiling. One eager step runs first: `llmopt.one_thread` measures
    its small calls, the graph follows those measurements, and the whole step runs on one thread where
    most of them were faster so (on all threads elsewhere: torch.compile builds a graph per thread count,
    so this is chosen once, before compiling)."""
    start = time.perf_counter()
    n = prompt.shape[1]
    cache = static_cache(model, n + gen_len)
    token = prefill(model, prompt, cache)
    if gen_len < 2:
        return time.perf_counter() - start        # no decode step to compile
    token = _step(model, token, cache, n, alone=False, compiled=False)
    setattr(model, _ALONE, token.device.type == "cpu" and one_thread.mostly_faster_alone())
    for i in range(1, min(3, gen_len)):       # StaticCache writes at its own count: each step a next position
        token = step(model, token, cache, n + i)
    return time.perf_counter() - start
