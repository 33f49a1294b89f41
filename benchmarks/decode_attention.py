"""A decode step's attention: transformers' SDPA function against llmopt's (`llmopt.attention`), per layer.

    OMP_WAIT_POLICY=passive python benchmarks/decode_attention.py
    OMP_WAIT_POLICY=passive python benchmarks/decode_attention.py --lengths 512 640 2048 --rounds 15

For one query token over KV caches of SmolLM2-135M's and Gemma3-270M's attention shapes (float32, views
of a larger buffer as llmopt's growing cache hands them over, no mask), times the function each model's
attention calls in transformers ("sdpa": grouped-query SDPA with `enable_gqa`) and llmopt's ("llmopt_sdpa":
the query heads folded onto their KV head), on one thread and on all, interleaved; median microseconds per
call and the ratio. On all threads llmopt's function also makes its measured one-thread choice
(`llmopt.one_thread`), as it does when serving a model. Prints the largest difference between the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmopt import attention

SHAPES = {"SmolLM2-135M": (9, 3, 64), "Gemma3-270M": (4, 1, 256)}     # query heads, KV heads, head dim


class _Attn(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _us(fn, calls: int = 20) -> float:
    """Mean microseconds per call over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 640, 2048])
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    assert attention._registered()
    threads = torch.get_num_threads()
    funcs = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", attention.NAME)}
    print(f"torch {torch.__version__}, {threads} threads; microseconds per call, median of {args.rounds} rounds")
    print("model | cache | threads | transformers sdpa | llmopt | llmopt x | max |diff|")
    gen = torch.Generator().manual_seed(0)
    for model, (heads, kv_heads, dim) in SHAPES.items():
        module = _Attn(heads // kv_heads)
        for n in args.lengths:
            q = torch.randn(1, heads, 1, dim, generator=gen)
            k, v = (torch.randn(1, kv_heads, 2 * n, dim, generator=gen)[:, :, :n] for _ in range(2))
            calls = {name: (lambda f=f: f(module, q, k, v, None, dropout=0.0, scaling=dim ** -0.5))
                     for name, f in funcs.items()}
            diff = (calls["sdpa"]()[0] - calls[attention.NAME]()[0]).abs().max().item()
            for t in sorted({1, threads}):
                torch.set_num_threads(t)
                us = {name: [] for name in calls}
                for i in range(args.rounds):
                    for name in calls if i % 2 else reversed(list(calls)):
                        us[name].append(_us(calls[name]))
                torch.set_num_threads(threads)
                base, ours = statistics.median(us["sdpa"]), statistics.median(us[attention.NAME])
                print(f"{model} | {n} | {t} | {base:.1f} | {ours:.1f} | {base / ours:.2f}x | {diff:.1e}")


if __name__ == "__main__":
    main()
