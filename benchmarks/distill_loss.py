"""Time of the forward-KL distillation loss, forward + backward, at a real step's shape.

    python benchmarks/distill_loss.py                      # SmolLM2: batch 2 x 512 tokens, 49152 vocabulary

Compares, interleaved in one process, autograd through the plain formula (log_softmax of both
models' logits, KL per token, mean) with llmopt's fused `fkl`, which computes the gradient in the
forward pass chunk by chunk; prints the median of each and their ratio, and checks the two
gradients agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmopt.distill.losses import _kl, divergence


def formula(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The loss as `rkl` and `jsd` still compute it: autograd through log_softmax and the KL."""
    return _kl(F.log_softmax(t.float(), dim=-1), F.log_softmax(s.float(), dim=-1)).mean()


def timed(loss_fn, s0: torch.Tensor, t: torch.Tensor) -> tuple[float, torch.Tensor]:
    s = s0.clone().requires_grad_(True)
    start = time.perf_counter()
    loss_fn(s, t).backward()
    return time.perf_counter() - start, s.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    s0, t = torch.randn(args.tokens, args.vocab) * 3, torch.randn(args.tokens, args.vocab) * 3
    runs = {"formula": [], "fused": []}
    fns = {"formula": formula, "fused": lambda s, t: divergence(s, t, "fkl")}
    grads = {}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            seconds, grads[name] = timed(fn, s0, t)
            runs[name].append(seconds)
    error = (grads["fused"] - grads["formula"]).abs().max().item()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens x {args.vocab} vocabulary, "
          f"{args.rounds} interleaved rounds; max |gradient difference| {error:.2e}")
    med = {name: statistics.median(v) for name, v in runs.items()}
    for name, v in med.items():
        print(f"  {name:8s} forward + backward: {v * 1000:8.1f} ms (median)")
    print(f"  fused is {med['formula'] / med['fused']:.2f}x the formula's speed")


if __name__ == "__main__":
    main()
