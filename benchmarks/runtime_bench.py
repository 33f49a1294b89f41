"""The runtime table of docs/runtime.md: GPTQ 4-bit (llmopt's defaults) against its original, per model.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw python benchmarks/runtime_bench.py
    python benchmarks/runtime_bench.py --models smollm2-135m --repeats 3 --gen-len 64   # shorter

For each model: `llmopt quantize MODEL --method gptq` (the defaults except the calibration size;
reused when OUT already holds it), then two `llmopt bench` runs, each one process with interleaved
rounds: against the float32 original (with quality: perplexity, KL, top-1 agreement) and against the
bfloat16 original (`--dtype bfloat16`: every model's unquantized tensors and activations in bf16;
speed only). Both with `--head auto` (the runtime's default: the full-precision head served mixed,
int8 and int4 rows, on CPU); the float32 run is repeated for each of `--heads` (default `int8`, `full`
and `int4`: one bench run each, ratios against its own baseline), so the head's share in speed, memory
and quality is visible. Then the greedy continuation of the README's prompt from both models.
Prints one markdown table per model; the full bench reports go to OUT/<model>-<dtype>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmopt.bench.run import BenchOptions, bench
from llmopt.generate import GenerateOptions, generate
from llmopt.models import load_model

PROMPT = "The capital of France is"


def quantize(model: str, out: Path, nsamples: int, seq_len: int) -> Path:
    target = out / f"{model}-gptq4"
    if not (target / "llmopt.json").is_file():
        cmd = [sys.executable, "-m", "llmopt", "quantize", model, "-o", str(target), "--method", "gptq",
               "--nsamples", str(nsamples), "--seq-len", str(seq_len)]
        print("$ llmopt " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
    return target


def bench_pair(model: str, quantized: Path, dtype: str, args, quality: bool) -> dict:
    """One interleaved run: the original and the quantized model as llmopt serves it; then, per other
    --head, one more run whose quantized row is appended."""
    opts = BenchOptions(models=[str(quantized)], baseline=model, dtype=dtype, device="cpu", head="auto",
                        seq_len=args.seq_len, ppl_windows=args.ppl_windows, prompt_len=args.prompt_len,
                        gen_len=args.gen_len, repeats=args.repeats, skip_quality=not quality, memory=False)
    report = bench(opts)
    if dtype != "float32":
        return report
    for head in args.heads:
        other = bench(BenchOptions(**{**opts.__dict__, "head": head}))
        # a run of its own per other head; its ratios are against its own baseline, as in the first
        report["models"].append({**other["models"][1], "name": f"{quantized} (--head {head})"})
    return report


def row(r: dict) -> str:
    m, d = r["metrics"], r["deltas"]

    def x(k: str) -> str:
        if k not in d:
            return "1" if not d else "-"
        v = d[k]
        span = f" ({v['min_x']:.2f}..{v['max_x']:.2f})" if "min_x" in v else ""
        return f"{v['x']:.2f}x{span}"

    ppl = "-" if m["perplexity"] is None else f"{m['perplexity']:.3f}"
    kl = "-" if m["kl_vs_baseline"] is None else f"{m['kl_vs_baseline']:.4f}"
    top1 = "-" if m["top1_agreement_pct"] is None else f"{m['top1_agreement_pct']:.1f}%"
    bw = "-" if m.get("weight_bandwidth_pct") is None else f"{m['weight_bandwidth_gb_s']:.2f} ({m['weight_bandwidth_pct']:.0f}%)"
    return (f"| {r['name']} | {m['weight_bytes'] / 1e6:.1f} MB ({m['size_vs_original_dtype_x']:.2f}x) | {ppl} | "
            f"{kl} | {top1} | {m['prefill_tok_s']:.1f}: {x('prefill_tok_s')} | {m['decode_tok_s']:.2f}: "
            f"{x('decode_tok_s')} | {bw} |")


def table(report: dict) -> None:
    method = report["method"]
    print(f"\n{report['baseline']}, --dtype {method['dtype']}: prompt {method['settings']['prompt_len']}, "
          f"{method['settings']['gen_len']} new tokens, {method['settings']['repeats']} interleaved rounds, "
          f"{method['torch_threads']} threads, memory copy bandwidth {method['memory_bandwidth_gb_s']:.1f} GB/s\n")
    print("| model | weights in memory (x original's stored dtype) | ppl | KL | top-1 | prefill tok/s: x | "
          "decode tok/s: x | weights GB/s (% of memory) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["models"]:
        print(row(r))


def greedy(spec: str, head: str) -> str:
    loaded = load_model(spec, device="cpu", head=head)
    return generate(loaded.model, loaded.tokenizer, GenerateOptions(prompt=PROMPT, max_new_tokens=40)).text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--out", default="out/runtime-bench")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (command default 128)")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per perplexity window")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--heads", nargs="*", default=["int8", "full", "int4"],
                    help="other --head values, each a float32 bench run of its own beside the auto one")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# runtime bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"LLMOPT_DATA={os.environ.get('LLMOPT_DATA', '(unset)')}")
    for model in args.models:
        quantized = quantize(model, out, args.nsamples, args.calib_seq_len)
        for dtype in args.dtypes:
            report = bench_pair(model, quantized, dtype, args, quality=dtype == "float32")
            (out / f"{model}-{dtype}.json").write_text(json.dumps(report, indent=2) + "\n")
            table(report)
        print(f"\ngreedy, 40 tokens after {PROMPT!r}:")
        for spec, head in ((model, "full"), (str(quantized), "auto"), *((str(quantized), h) for h in args.heads)):
            print(f"- {spec} (--head {head}): {greedy(spec, head)!r}")


if __name__ == "__main__":
    main()
