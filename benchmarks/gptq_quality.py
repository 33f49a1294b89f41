"""Perplexity of SmolLM2-135M quantized with GPTQ vs round-to-nearest, and GPTQ's quantization time
against the floor of two plain forward passes of the same calibration tokens.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \\
        python benchmarks/gptq_quality.py [--windows 32] [--nsamples 128] [--seq-len 512] [--out DIR]

Calibration: --nsamples random windows of --seq-len tokens from wiki.valid.raw (seed 0).
Evaluation: the first --windows non-overlapping 2048-token windows of wiki.test.raw, scored with
llmopt.bench.quality.perplexity on the model as `llmopt.models.load_model` loads the checkpoint
(llmopt's runtime: int4/int8 kernels on CPU). Each result line is printed as soon as it exists, so
an interrupted run still reports what it measured; a Markdown table and the JSON come last.

Labels: an unqualified "GPTQ ..." is today's defaults (act-order with static groups, range search);
"no-act-order" / "no-mse" name what is switched off, "RTN ... mse" what is switched on. "g128" is
the group size asked for; llmopt writes the largest power of two up to it that divides every input
width (SmolLM2: 64, printed as "group"), while "partial-group" keeps 128 with a partial last group, the
layout llmopt wrote before, which other loaders refuse. Without --only every variant runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmopt.bench.quality import perplexity
from llmopt.data import Windows, load_windows, text_windows
from llmopt.errors import UserError
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, pipeline, quantize

# label -> (QuantizeOptions overrides, label of the RTN row its perplexity increase is compared with).
# Every variant names act-order (desc_act), the range search (mse) and the output head (lm_head: kept
# in full precision, as by default) explicitly, so a label keeps its meaning when a default changes.
# The unqualified "GPTQ w4 g128" etc. are today's defaults.
W4, W3, PC = dict(bits=4, group_size=128), dict(bits=3, group_size=128), dict(bits=4, group_size=-1)
RTN, GPTQ = dict(method="rtn", desc_act=False, lm_head=False), dict(method="gptq", lm_head=False)
VARIANTS: dict[str, tuple[dict, str | None]] = {
    "RTN w4 g128": ({**RTN, **W4, "mse": False}, "RTN w4 g128"),
    "RTN w4 g128 mse": ({**RTN, **W4, "mse": True}, "RTN w4 g128"),
    "GPTQ w4 g128 no-act-order no-mse": ({**GPTQ, **W4, "desc_act": False, "mse": False}, "RTN w4 g128"),
    "GPTQ w4 g128 no-act-order": ({**GPTQ, **W4, "desc_act": False, "mse": True}, "RTN w4 g128"),
    "GPTQ w4 g128 no-mse": ({**GPTQ, **W4, "desc_act": True, "mse": False}, "RTN w4 g128"),
    "GPTQ w4 g128": ({**GPTQ, **W4, "desc_act": True, "mse": True}, "RTN w4 g128"),
    # the layout llmopt wrote before fitting the group size to the input widths: a partial last group
    # where 128 does not divide (SmolLM2's 576), which transformers and GPTQModel refuse to load
    "RTN w4 g128 partial-group": ({**RTN, **W4, "mse": False, "partial": True}, "RTN w4 g128 partial-group"),
    "GPTQ w4 g128 partial-group": ({**GPTQ, **W4, "desc_act": True, "mse": True, "partial": True},
                                   "RTN w4 g128 partial-group"),
    "RTN w3 g128": ({**RTN, **W3, "mse": False}, "RTN w3 g128"),
    "GPTQ w3 g128": ({**GPTQ, **W3, "desc_act": True, "mse": True}, "RTN w3 g128"),
    "RTN w4 per-channel": ({**RTN, **PC, "mse": False}, "RTN w4 per-channel"),
    "GPTQ w4 per-channel no-act-order": ({**GPTQ, **PC, "desc_act": False, "mse": True}, "RTN w4 per-channel"),
    "GPTQ w4 per-channel": ({**GPTQ, **PC, "desc_act": True, "mse": True}, "RTN w4 per-channel"),
    "int8 per-channel": (dict(method="int8", desc_act=False, mse=False, lm_head=False), None),
}


@torch.inference_mode()
def two_forward_passes(model, windows: torch.Tensor) -> float:
    """Seconds for two plain forward passes (one window at a time) of the calibration tokens."""
    t = time.perf_counter()
    for _ in range(2):
        for w in windows:
            model(w.unsqueeze(0), use_cache=False)
    return time.perf_counter() - t


def run_variant(label: str, args, work: Path, evals: Windows, results: dict) -> None:
    """Quantize one variant, load it back through llmopt's runtime, score it; print one line."""
    overrides, _ = VARIANTS[label]
    partial = overrides.get("partial", False)
    out = work / label.replace(" ", "_")
    opts = QuantizeOptions(model=args.model, output=str(out), calib="wikitext2", nsamples=args.nsamples,
                           seq_len=args.seq_len, seed=0, device="cpu", force=True,
                           **{k: v for k, v in overrides.items() if k != "partial"})
    fit = pipeline.fit_group_size
    if partial:                        # keep the requested group size whatever the widths
        pipeline.fit_group_size = lambda requested, widths: (requested, None)
    t = time.perf_counter()
    try:
        summary = quantize(opts)
    except UserError as e:             # e.g. 4-bit per channel on widths other loaders refuse
        print(f"{label}: refused: {e}", flush=True)
        return
    finally:
        pipeline.fit_group_size = fit
    qtime = time.perf_counter() - t
    loaded = load_model(str(out), device="cpu")
    t = time.perf_counter()
    ppl = perplexity(loaded.model, evals)
    ppl0 = results["baseline"]
    line = (f"{label}: group {summary['group_size']}, ppl {ppl:.3f} (+{ppl - ppl0:.3f}), quantize {qtime:.1f}s "
            f"(layers {summary['quantize_s']:.1f}s), mean layer error {summary['mean_error']:.5f}, "
            f"quantized bytes {summary['quantized_bytes_vs_bf16']:.3f}x bf16, eval {time.perf_counter() - t:.0f}s")
    if overrides["method"] == "gptq" and "floor_s" in results:
        line += f"; layer-by-layer time / floor = {summary['quantize_s'] / results['floor_s']:.2f}"
    print(line, flush=True)
    results[label] = {"ppl": ppl, "quantize_s": qtime, "layers_s": summary["quantize_s"],
                      "mean_error": summary["mean_error"], "bytes_vs_bf16": summary["quantized_bytes_vs_bf16"],
                      "group_size": summary["group_size"], "disk_bytes": summary["disk_bytes"]}
    del loaded
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


def markdown(results: dict) -> str:
    """The docs' table: perplexity, its increase, and the increase as a multiple of its RTN row's."""
    ppl0 = results["baseline"]
    lines = ["| variant | perplexity | increase | increase vs RTN's |", "| --- | --- | --- | --- |"]
    for label, (_, ref) in VARIANTS.items():
        if label not in results:
            continue
        r = results[label]
        vs = ""
        if ref in results:
            vs = f"{(r['ppl'] - ppl0) / (results[ref]['ppl'] - ppl0):.2f}"
        lines.append(f"| {label} | {r['ppl']:.3f} | +{r['ppl'] - ppl0:.3f} | {vs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), metavar="LABEL",
                    help="labels to run (default: all, in this order: " + "; ".join(VARIANTS) + ")")
    ap.add_argument("--no-floor", action="store_true", help="skip the two-forward-pass timing")
    ap.add_argument("--out", default=None, help="where checkpoints go (default: a temp dir, deleted)")
    args = ap.parse_args()

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gptq-bench-"))
    base = load_model(args.model, device="cpu")
    evals = load_windows(base.tokenizer, "wikitext2", "eval", 2048, max_windows=args.windows)   # BOS not scored
    desc = evals.description
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; python {' '.join(sys.argv)}", flush=True)
    print(f"# eval {len(evals.ids)} x 2048 tokens of {desc}; calibration {args.nsamples} x {args.seq_len}", flush=True)
    t = time.perf_counter()
    ppl0 = perplexity(base.model, evals)
    dtype = next(base.model.parameters()).dtype
    print(f"baseline {str(dtype).removeprefix('torch.')}: ppl {ppl0:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)
    results: dict = {"baseline": ppl0}

    if not args.no_floor:
        calib, _ = text_windows(base.tokenizer, "wikitext2", "calib", args.seq_len, nsamples=args.nsamples, seed=0)
        floor = two_forward_passes(base.model, calib)
        print(f"floor: two forward passes of {args.nsamples} x {args.seq_len} tokens: {floor:.1f}s", flush=True)
        results["floor_s"] = floor
    del base

    for label in args.only or VARIANTS:
        run_variant(label, args, work, evals, results)
    print(markdown(results))
    print(json.dumps(results, indent=1))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
