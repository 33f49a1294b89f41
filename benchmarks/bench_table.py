"""Reproduce the README's `llmopt bench` table: SmolLM2-135M against its 4-bit GPTQ and int8 outputs.

    python benchmarks/bench_table.py                      # quantize into --out when missing, then bench
    python benchmarks/bench_table.py --self               # smollm2-135m against itself: the noise floor
    python benchmarks/bench_table.py --models out/a out/b # given models against smollm2-135m
    python benchmarks/bench_table.py --ppl-windows 8 --repeats 3   # quicker, less precise

The quantized models are made like the quickstart recipe (GPTQ 4-bit, group 128, symmetric, and
int8 in the GPTQ layout; 32 calibration windows of 512 tokens). Quality text: wikitext2 when
$LLMOPT_DATA names the wikitext-2-raw folder, else the built-in text. Prints the machine, the
settings, bench's table (stderr) and a Markdown table (stdout) for the README; `--json PATH`
keeps the whole report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from rich.console import Console  # noqa: E402

from llmopt.bench.report import render_table  # noqa: E402
from llmopt.bench.run import BenchOptions, bench  # noqa: E402
from llmopt.cli.common import RichProgress  # noqa: E402

BASE = "smollm2-135m"
VARIANTS = {"gptq4": dict(method="gptq", bits=4), "int8": dict(method="int8")}


def make_variants(out: Path, progress) -> list[str]:
    from llmopt.quantize import QuantizeOptions, quantize

    paths = []
    for name, kw in VARIANTS.items():
        path = out / f"smollm2-{name}"
        if not (path / "config.json").is_file():
            print(f"$ llmopt quantize {BASE} -o {path} --method {kw['method']}"
                  f"{' --bits %d' % kw['bits'] if 'bits' in kw else ''} --nsamples 32 --seq-len 512 --device cpu",
                  file=sys.stderr, flush=True)
            quantize(QuantizeOptions(model=BASE, output=str(path), group_size=128, nsamples=32, seq_len=512,
                                     device="cpu", **kw), progress)
        paths.append(str(path))
    return paths


def _pct(d: dict | None) -> str:
    return "" if not d else f" ({d['pct']:+.1f}%)"


def _x(d: dict | None) -> str:
    if not d:
        return ""
    noise = " ~" if d.get("within_noise") else ""
    return f" ({d['x']:.2f}x{noise})"


def markdown(report: dict) -> str:
    head = ("| model | params | weights (bits/w) | disk | perplexity | KL vs base | top-1 agree | TTFT | "
            "decode tok/s | peak RSS |")
    lines = [head, "|" + " --- |" * 10]
    for r in report["models"]:
        m, d = r["metrics"], r["deltas"]
        mb = lambda v: "-" if v is None else f"{v / 1e6:.1f} MB"  # noqa: E731
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(" | ".join([
            f"| `{r['name']}`" + (" (baseline)" if r["role"] == "baseline" else ""),
            f"{m['parameters'] / 1e6:.1f}M",
            f"{mb(m['weight_bytes'])} ({m['bits_per_weight']:.1f}){_x(d.get('weight_bytes'))}",
            f"{mb(m['disk_bytes'])}{_x(d.get('disk_bytes'))}",
            f"{f(m['perplexity'], '.3f')}{_pct(d.get('perplexity'))}",
            f(m["kl_vs_baseline"], ".4f"),
            "-" if m["top1_agreement_pct"] is None else f"{m['top1_agreement_pct']:.1f}%",
            "-" if m["ttft_s"] is None else f"{m['ttft_s'] * 1000:.0f} ms{_x(d.get('ttft_s'))}",
            f"{f(m['decode_tok_s'], '.1f')}{_x(d.get('decode_tok_s'))}",
            f"{mb(m['peak_rss_bytes'])}{_x(d.get('peak_rss_bytes'))} |",
        ]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="models to bench against smollm2-135m (default: its GPTQ/int8)")
    ap.add_argument("--self", dest="self_", action="store_true", help="smollm2-135m against itself")
    ap.add_argument("--out", default="/tmp/llmopt-bench", help="where the quantized models are made")
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--json", help="also write the whole report here")
    args = ap.parse_args()

    progress = RichProgress(True)
    if args.self_:
        models = [BASE]
    elif args.models:
        models = args.models
    else:
        models = make_variants(Path(args.out), progress)
    opts = BenchOptions(models=models, baseline=BASE, ppl_windows=args.ppl_windows, repeats=args.repeats,
                        gen_len=args.gen_len, prompt_len=args.prompt_len, device="cpu")
    cmd = (f"llmopt bench {' '.join(models)} --baseline {BASE} --ppl-windows {args.ppl_windows} "
           f"--repeats {args.repeats} --gen-len {args.gen_len} --prompt-len {args.prompt_len} --device cpu")
    print(f"$ {cmd}", file=sys.stderr, flush=True)
    started = time.time()
    report = bench(opts, progress)
    Console(stderr=True, width=240).print(render_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    method = report["method"]
    print(f"<!-- python benchmarks/bench_table.py {' '.join(sys.argv[1:])} -->")
    print(f"Measured {report['created'][:10]} on {platform.machine()} {platform.system()}, "
          f"{os.cpu_count()} CPU cores (shared, noisy), {method['torch_threads']} torch threads, "
          f"{method['device']} {method['dtype']}, torch {report['versions']['torch']}; "
          f"quality: {method['ppl_data']}, {report['models'][0]['metrics']['ppl_windows'] or 0} windows of "
          f"{method['settings']['seq_len']} tokens; speed: prompt {args.prompt_len}, {args.gen_len} new "
          f"tokens, median of {args.repeats} interleaved rounds (x = vs baseline, median of per-round ratios; "
          f"~ = within the rounds' spread); wall time {time.time() - started:.0f} s.\n")
    print(f"`{cmd}`\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
