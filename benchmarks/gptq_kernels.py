"""Per-layer speed of QuantLinear's paths vs F.linear, on SmolLM2-135M's Linear shapes.

    python benchmarks/gptq_kernels.py [--rows 1 8 16 32 64 512] [--repeat 30]

Prints, for each shape and number of rows M, the time of fp32 F.linear and the ratio
(F.linear time / path time; > 1 means faster than fp32) of: the int4 kernel (bf16 activations),
dequantize-then-matmul (what QuantLinear does from DEQUANT_MIN_ROWS rows on), and the int8 kernel.
All timings are interleaved in one process; medians over `--repeat` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmopt.quantize.gptq import QuantSpec, rtn_quantize
from llmopt.quantize.qlinear import QuantLinear

SHAPES = {"q_proj/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576),
          "down_proj": (576, 1536), "lm_head": (49152, 576)}


def _time(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 512])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'layer':14} {'M':>5} {'fp32 ms':>9} {'int4 kern':>10} {'int4 deq':>9} {'int8 kern':>10}")
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * 0.02
            r4 = rtn_quantize(w, QuantSpec(4, 128, True))
            r8 = rtn_quantize(w, QuantSpec(8, -1, True))
            m4 = QuantLinear(r4.q, r4.zeros, r4.scales, r4.g_idx, None, 4, 128)
            m8 = QuantLinear(r8.q, r8.zeros, r8.scales, r8.g_idx, None, 8, -1)
            for rows in args.rows:
                if name == "lm_head" and rows > 64:
                    continue
                x = torch.randn(rows, k)
                fns = {"fp32": lambda a: F.linear(a, w), "k4": m4.forward_kernel, "d4": m4.forward_dequant,
                       "k8": m8.forward_kernel}
                times = {key: [] for key in fns}
                for fn in fns.values():
                    fn(x)
                for _ in range(args.repeat):
                    for key, fn in fns.items():
                        times[key].append(_time(fn, x))
                med = {key: statistics.median(v) for key, v in times.items()}
                print(f"{name:14} {rows:5d} {med['fp32'] * 1e3:9.3f} {med['fp32'] / med['k4']:9.2f}x "
                      f"{med['fp32'] / med['d4']:8.2f}x {med['fp32'] / med['k8']:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
