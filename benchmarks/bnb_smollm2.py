"""bitsandbytes LLM.int8 / NF4 / FP4 on SmolLM2-135M against float32: quality, size and speed, side by side.

Each method is produced by `llmopt quantize` (the library call behind it) with its defaults; the
GPTQ-layout methods (`gptq`, `rtn`, `int8`) can join with --methods, calibrated on --nsamples x
--calib-seq-len tokens of wiki.valid.raw (seed 0). Every output and the float32 baseline then go
through `llmopt bench` in ONE process: perplexity on the first WINDOWS x SEQ_LEN
tokens of wiki.test.raw, KL and top-1 agreement vs the baseline, and decode / prefill speed in
interleaved rounds (ratios taken round by round, so shared-machine noise hits every model alike).

    export OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw
    python benchmarks/bnb_smollm2.py                       # the numbers in docs/bitsandbytes.md
    python benchmarks/bnb_smollm2.py --methods llm-int8,nf4,gptq --nsamples 32 --calib-seq-len 512   # GPTQ alongside
    python benchmarks/bnb_smollm2.py --extra out/smollm2-gptq4   # add any other output to the same table
    python benchmarks/bnb_smollm2.py --windows 2 --seq-len 256 --repeats 1 --gen-len 16   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from llmopt.bench.run import BenchOptions, bench
from llmopt.quantize import QuantizeOptions, quantize
from llmopt.quantize.options import GPTQ_METHODS

BAR_INT8_PCT = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="llm-int8,nf4,fp4",
                    help="comma-separated `llmopt quantize --method` values, each with its defaults")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows for gptq")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window for gptq")
    ap.add_argument("--extra", action="append", default=[], help="another model/output to bench alongside")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=6.0, help="LLM.int8 outlier threshold")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-RSS child processes")
    ap.add_argument("--work", default=None, help="where the quantized outputs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the full bench report here")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    work = Path(args.work or tempfile.mkdtemp(prefix="llmopt-bnb-"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, outputs in {work}; python {' '.join(sys.argv)}", flush=True)
    made = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        out = work / f"{args.model}-{method}"
        extra = {"threshold": args.threshold} if method == "llm-int8" else {}
        if method in GPTQ_METHODS:
            extra = {"calib": "wikitext2", "nsamples": args.nsamples, "seq_len": args.calib_seq_len, "seed": 0}
        summary = quantize(QuantizeOptions(model=args.model, output=str(out), method=method, device="cpu",
                                           force=True, **extra))
        made[method] = summary
        print(f"quantize {method:9s} {summary['wall_time_s']:6.1f} s  weight error mean "
              f"{summary.get('weight_rel_error_mean', float('nan')):.4f} max "
              f"{summary.get('weight_rel_error_max', float('nan')):.4f}  disk {summary['disk_bytes'] / 1e6:.1f} MB",
              flush=True)

    models = [made[m]["output"] for m in made] + list(args.extra)
    report = bench(BenchOptions(models=models, baseline=args.model, ppl_data="wikitext2", seq_len=args.seq_len,
                                ppl_windows=args.windows, prompt_len=args.prompt_len, gen_len=args.gen_len,
                                repeats=args.repeats, memory=not args.no_memory, device="cpu"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")

    m = report["method"]
    print(f"\nbench: {m['ppl_data_description']}; {args.windows} x {args.seq_len} tokens; "
          f"prompt {args.prompt_len}, {args.gen_len} new tokens, {args.repeats} interleaved rounds, "
          f"{m['torch_threads']} threads, {m['device']}")
    head = (f"{'model':28s} {'ppl':>8s} {'dppl':>7s} {'KL':>8s} {'top1%':>6s} {'weights MB':>10s} "
            f"{'disk MB':>8s} {'decode tok/s':>12s} {'decode x':>17s} {'prefill x':>17s} {'peak RSS MB':>11s}")
    print(head)
    print("-" * len(head))
    base_ppl = report["models"][0]["metrics"]["perplexity"]
    for row in report["models"]:
        x, d = row["metrics"], row["deltas"]
        name = Path(row["name"]).name if row["role"] != "baseline" else f"{row['name']} (fp32)"
        print(f"{name[:28]:28s} {x['perplexity']:8.3f} {100 * (x['perplexity'] / base_ppl - 1):+6.2f}% "
              f"{_num(x['kl_vs_baseline'], '8.4f')} {_num(x['top1_agreement_pct'], '6.1f')} "
              f"{x['weight_bytes'] / 1e6:10.1f} {(x['disk_bytes'] or 0) / 1e6:8.1f} "
              f"{x['decode_tok_s']:12.1f} {_ratio(d.get('decode_tok_s')):>17s} {_ratio(d.get('prefill_tok_s')):>17s} "
              f"{_num(x['peak_rss_bytes'] and x['peak_rss_bytes'] / 1e6, '11.0f')}")

    ok = True
    for row in report["models"][1:]:
        if row["name"] == made.get("llm-int8", {}).get("output"):
            delta = 100 * abs(row["metrics"]["perplexity"] / base_ppl - 1)
            ok = delta <= BAR_INT8_PCT
            print(f"\nLLM.int8 (--threshold {args.threshold:g}) perplexity within {BAR_INT8_PCT}% of the "
                  f"baseline: {'yes' if ok else 'NO'} ({delta:.2f}%)")
    return 0 if ok else 1


def _num(v, fmt: str) -> str:
    width = int(fmt.split(".")[0])
    return f"{v:{fmt}}" if v is not None else "-".rjust(width)


def _ratio(d: dict | None) -> str:
    if not d:
        return "-"
    if "min_x" in d:
        return f"{d['x']:.2f}x ({d['min_x']:.2f}..{d['max_x']:.2f})"
    return f"{d['x']:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
