"""Decode speed and weight bytes of SmolLM2-135M in llmopt's 4-bit GPTQ runtime vs the fp32 baseline,
measured side by side in one `llmopt bench` run (interleaved rounds).

    OMP_WAIT_POLICY=passive python benchmarks/gptq_speed.py [--checkpoint DIR] [--repeats 5]

Without --checkpoint, a 4-bit g128 checkpoint is written with --method rtn (no calibration; it has
the same layout and runtime cost as GPTQ's). Prints decode tokens/s of both, their ratio, and the
bytes of the quantized Linear layers relative to the same layers in bf16.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from llmopt.bench.run import BenchOptions, bench
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize
from llmopt.quantize.qlinear import QuantLinear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    args = ap.parse_args()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = str(Path(tempfile.mkdtemp(prefix="gptq-speed-")) / "smollm2-w4g128")
        quantize(QuantizeOptions(model="smollm2-135m", output=ckpt, method="rtn", bits=4, group_size=128,
                                 device="cpu"))
    q = load_model(ckpt, device="cpu").model
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    qbytes = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    bf16 = sum(2 * m.n_logical_params() for m in layers)
    print(f"quantized layers: {len(layers)} ({', '.join(sorted({m.mode for m in layers}))}); bytes in memory "
          f"{qbytes / 1e6:.1f} MB vs {bf16 / 1e6:.1f} MB in bf16 = {qbytes / bf16:.3f}x", flush=True)
    del q
    report = bench(BenchOptions(models=[ckpt], baseline="smollm2-135m", skip_quality=True, memory=False,
                                prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
                                device="cpu"))
    base, quant = report["models"][0], report["models"][1]
    for r in (base, quant):
        m = r["metrics"]
        print(f"{r['name']}: decode {m['decode_tok_s']:.1f} tok/s, prefill {m['prefill_tok_s']:.1f} tok/s, "
              f"weight bytes {m['weight_bytes'] / 1e6:.1f} MB", flush=True)
    d = quant["deltas"]["decode_tok_s"]
    print(f"4-bit decode / fp32 decode: {d['x']:.2f}x (per-round ratios {d['min_x']:.2f}..{d['max_x']:.2f}); "
          f"prefill {quant['deltas']['prefill_tok_s']['x']:.2f}x", flush=True)

if __name__ == "__main__":
    main()
