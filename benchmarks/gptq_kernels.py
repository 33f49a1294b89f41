"""Per-layer speed of QuantLinear's paths vs F.linear, on SmolLM2-135M's Linear shapes.

    OMP_WAIT_POLICY=passive python benchmarks/gptq_kernels.py [--rows 1 4 16 64 128 256 512] [--repeat 7]

For each shape and number of rows M: the time of fp32 F.linear, and its ratio to each path
(fp32 time / path time, the median of per-round ratios; > 1 means faster than fp32): int4 kernel
(bf16 activations), int4 dequantize + GEMM (`forward_dequant`, in `dequant_dtype()`), int8 kernel,
int8 dequantize + GEMM, 3-bit dequantize + GEMM (its only path). All paths run interleaved in one
process. Last, the crossover: the smallest M from which int4 dequantize + GEMM beats the int4
kernel at that M and every larger one, per shape and for one decoder layer's seven Linears together
(what DEQUANT_MIN_ROWS is set from).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmopt.quantize.gptq import QuantSpec, rtn_quantize
from llmopt.quantize.qlinear import QuantLinear, dequant_dtype

# name: (out, in, how many per decoder layer)
SHAPES = {"q/o_proj": (576, 576, 2), "k/v_proj": (192, 576, 2), "gate/up_proj": (1536, 576, 2),
          "down_proj": (576, 1536, 1), "lm_head": (49152, 576, 0)}
PATHS = ("k4", "d4", "k8", "d8", "d3")


def _layers(n: int, k: int) -> tuple[torch.Tensor, dict]:
    w = torch.randn(n, k) * 0.02
    mods = {}
    for key, bits, group in (("4", 4, 128), ("8", 8, -1), ("3", 3, 128)):
        r = rtn_quantize(w, QuantSpec(bits, group, True))
        mods[key] = QuantLinear(r.q, r.zeros, r.scales, r.g_idx, None, bits, group)
    m4, m8, m3 = mods["4"], mods["8"], mods["3"]
    fns = {"fp32": lambda a: F.linear(a, w), "k4": m4.forward_kernel, "d4": m4.forward_dequant,
           "k8": m8.forward_kernel, "d8": m8.forward_dequant, "d3": m3.forward_dequant}
    return w, fns


def _cell(fns: dict, x: torch.Tensor, repeat: int, budget_s: float) -> tuple[dict, dict]:
    """Median times and median per-round ratios (fp32 / path), at least 3 rounds within the budget."""
    for fn in fns.values():
        fn(x)
    times: dict[str, list[float]] = {key: [] for key in fns}
    start = time.perf_counter()
    for i in range(repeat):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            times[key].append(time.perf_counter() - t)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    ratio = {key: statistics.median(f / p for f, p in zip(times["fp32"], times[key])) for key in fns}
    return {key: statistics.median(v) for key, v in times.items()}, ratio


def _crossover(rows: list[int], kernel: list[float], dequant: list[float]) -> int | None:
    """Smallest M from which dequant is faster than the kernel at that M and all larger ones."""
    best = None
    for m, tk, td in reversed(list(zip(rows, kernel, dequant))):
        if td >= tk:
            break
        best = m
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 512])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds per cell after 3 rounds")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dequant GEMM in {dequant_dtype()}")
    print(f"{'layer':13} {'M':>4} {'fp32 ms':>8} " + " ".join(f"{p:>6}" for p in PATHS))
    layer_k4 = {m: 0.0 for m in args.rows}
    layer_d4 = {m: 0.0 for m in args.rows}
    with torch.inference_mode():
        for name, (n, k, count) in SHAPES.items():
            _, fns = _layers(n, k)
            tk, td = [], []
            for rows in args.rows:
                med, ratio = _cell(fns, torch.randn(rows, k), args.repeat, args.budget)
                tk.append(med["k4"])
                td.append(med["d4"])
                layer_k4[rows] += count * med["k4"]
                layer_d4[rows] += count * med["d4"]
                print(f"{name:13} {rows:4d} {med['fp32'] * 1e3:8.3f} "
                      + " ".join(f"{ratio[p]:5.2f}x" for p in PATHS), flush=True)
            print(f"{name:13} int4 crossover (dequant + GEMM beats the kernel from M =) "
                  f"{_crossover(args.rows, tk, td)}", flush=True)
    print("one decoder layer (2 q/o, 2 k/v, 2 gate/up, 1 down): int4 crossover M = "
          f"{_crossover(args.rows, [layer_k4[m] for m in args.rows], [layer_d4[m] for m in args.rows])}")


if __name__ == "__main__":
    main()
