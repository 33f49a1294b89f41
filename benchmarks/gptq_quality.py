"""Perplexity of SmolLM2-135M quantized with GPTQ vs round-to-nearest, and GPTQ's quantization time
against the floor of two plain forward passes of the same calibration tokens.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/work/shared/data/wikitext-2-raw \\
        python benchmarks/gptq_quality.py [--windows 32] [--nsamples 128] [--seq-len 512] [--out DIR]

Calibration: --nsamples random windows of --seq-len tokens from wiki.valid.raw (seed 0).
Evaluation: the first --windows non-overlapping 2048-token windows of wiki.test.raw, scored with
llmopt.bench.quality.perplexity on the model as `llmopt.models.load_model` loads the checkpoint
(llmopt's runtime: int4/int8 kernels on CPU). Variants run in priority order and each result line
is printed as soon as it exists, so an interrupted run still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llmopt.bench.quality import perplexity
from llmopt.data import text_windows
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize

VARIANTS = [  # (label, method, bits, group_size, desc_act)
    ("RTN w4 g128", "rtn", 4, 128, False),
    ("GPTQ w4 g128", "gptq", 4, 128, False),
    ("RTN w3 g128", "rtn", 3, 128, False),
    ("GPTQ w3 g128", "gptq", 3, 128, False),
    ("GPTQ w4 g128 desc-act", "gptq", 4, 128, True),
    ("RTN w4 per-channel", "rtn", 4, -1, False),
    ("GPTQ w4 per-channel", "gptq", 4, -1, False),
    ("GPTQ w4 per-channel desc-act", "gptq", 4, -1, True),
    ("GPTQ w3 g128 desc-act", "gptq", 3, 128, True),
    ("int8 per-channel", "int8", 8, -1, False),
]


@torch.inference_mode()
def two_forward_passes(model, windows: torch.Tensor) -> float:
    """Seconds for two plain forward passes (one window at a time) of the calibration tokens."""
    t = time.perf_counter()
    for _ in range(2):
        for w in windows:
            model(w.unsqueeze(0), use_cache=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--no-floor", action="store_true", help="skip the two-forward-pass timing")
    ap.add_argument("--out", default=None, help="where checkpoints go (default: a temp dir, deleted)")
    args = ap.parse_args()

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gptq-bench-"))
    base = load_model(args.model, device="cpu")
    evals, desc = text_windows(base.tokenizer, "wikitext2", "eval", 2048, max_windows=args.windows)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; eval {len(evals)} x 2048 tokens of {desc}", flush=True)
    t = time.perf_counter()
    ppl0 = perplexity(base.model, evals)
    print(f"baseline fp32: ppl {ppl0:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)
    results = {"baseline": ppl0}

    if not args.no_floor:
        calib, _ = text_windows(base.tokenizer, "wikitext2", "calib", args.seq_len, nsamples=args.nsamples, seed=0)
        floor = two_forward_passes(base.model, calib)
        print(f"floor: two forward passes of {args.nsamples} x {args.seq_len} tokens: {floor:.1f}s", flush=True)
        results["floor_s"] = floor
    del base

    for label, method, bits, group, desc_act in VARIANTS:
        if args.only and label not in args.only:
            continue
        out = work / label.replace(" ", "_")
        opts = QuantizeOptions(model=args.model, output=str(out), method=method, bits=bits, group_size=group,
                               desc_act=desc_act, calib="wikitext2", nsamples=args.nsamples, seq_len=args.seq_len,
                               seed=0, device="cpu", force=True)
        t = time.perf_counter()
        summary = quantize(opts)
        qtime = time.perf_counter() - t
        loaded = load_model(str(out), device="cpu")
        t = time.perf_counter()
        ppl = perplexity(loaded.model, evals)
        line = (f"{label}: ppl {ppl:.3f} (+{ppl - ppl0:.3f}), quantize {qtime:.1f}s "
                f"(layers {summary['quantize_s']:.1f}s), mean layer error {summary['mean_error']:.5f}, "
                f"quantized bytes {summary['quantized_bytes_vs_bf16']:.3f}x bf16, eval {time.perf_counter() - t:.0f}s")
        if method == "gptq" and "floor_s" in results:
            line += f"; layer-by-layer time / floor = {summary['quantize_s'] / results['floor_s']:.2f}"
        print(line, flush=True)
        results[label] = {"ppl": ppl, "quantize_s": qtime, "layers_s": summary["quantize_s"],
                          "mean_error": summary["mean_error"], "bytes_vs_bf16": summary["quantized_bytes_vs_bf16"]}
        del loaded
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    for label in results:
        if isinstance(results[label], dict) and label.startswith("GPTQ"):
            rtn = results.get(label.replace("GPTQ", "RTN").replace(" desc-act", ""))
            if rtn:
                ratio = (results[label]["ppl"] - ppl0) / (rtn["ppl"] - ppl0)
                print(f"{label}: ppl increase = {ratio:.2f} x RTN's", flush=True)
    print(json.dumps(results, indent=1))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
