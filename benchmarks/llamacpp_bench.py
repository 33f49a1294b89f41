"""The "llama.cpp beside llmopt, one run" table of docs/runtime.md: the float32 original, llmopt's GPTQ
checkpoint (llmopt's runtime) and GGUF files run by llama.cpp, in ONE `llmopt bench` run (interleaved
rounds, the same windows and prompt tokens for all).

    pip install 'llmopt[llamacpp]'
    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw python benchmarks/llamacpp_bench.py \\
        --work /tmp/llmopt-llamacpp-bench [--threads 2] [--repeats 3]

Files, made once under --work (reused when there):
  f16.gguf        `llmopt export MODEL -o f16.gguf --type f16`
  gptq-g32/       `llmopt quantize MODEL -o gptq-g32 --group-size 32 --nsamples 32 --seq-len 512`
  gptq-q4_0.gguf  `llmopt export gptq-g32 -o gptq-q4_0.gguf` (GPTQ's own 4-bit codes as Q4_0)
  q8_0.gguf       llama.cpp's own quantizer (`llama_model_quantize`) on f16.gguf, as gguf_llamacpp.py does
Then `llmopt bench MODEL gptq-g32 f16.gguf gptq-q4_0.gguf q8_0.gguf --gguf-runtime llama.cpp --prompt-len 512
--gen-len 128 --repeats N --ppl-windows 4 --seq-len 512 --ppl-data wikitext2`, whose JSON report is kept as
--work/report.json; prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from gguf_llamacpp import _reference_quantize


def _llmopt(*args: str, threads: int, out: Path | None = None) -> None:
    """Run one llmopt command in its own process with `threads` threads; its stdout to `out` if given."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive"}
    print("$ llmopt " + " ".join(args), file=sys.stderr, flush=True)
    with open(out, "w") if out else open(os.devnull, "w") as f:
        subprocess.run([sys.executable, "-m", "llmopt", *args], check=True, env=env, stdout=f if out else None)


def make_files(model: str, work: Path, threads: int) -> dict[str, Path]:
    files = {"f16": work / "f16.gguf", "gptq": work / "gptq-g32", "q4_0": work / "gptq-q4_0.gguf",
             "q8_0": work / "q8_0.gguf"}
    if not files["f16"].is_file():
        _llmopt("export", model, "-o", str(files["f16"]), "--type", "f16", threads=threads)
    if not (files["gptq"] / "llmopt.json").is_file():
        _llmopt("quantize", model, "-o", str(files["gptq"]), "--group-size", "32", "--nsamples", "32",
                "--seq-len", "512", "--device", "cpu", threads=threads)
    if not files["q4_0"].is_file():
        _llmopt("export", str(files["gptq"]), "-o", str(files["q4_0"]), threads=threads)
    if not files["q8_0"].is_file():
        _reference_quantize(files["f16"], files["q8_0"], "q8_0")
    return files


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _x(row: dict, key: str) -> str:
    d = row["deltas"].get(key)
    if not d:
        return ""
    return f" ({d['x']:.2f}x{' ~' if d.get('within_noise') else ''})"


def table(report: dict) -> str:
    """One markdown row per model; x = model / float32 baseline (timed: median of per-round ratios)."""
    lines = ["| model | runtime | weights MB | file/dir MB | ppl | KL | top-1 | TTFT ms | prefill tok/s | "
             "decode tok/s (min..max) | peak RSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["models"]:
        m, t = r["metrics"], r["timings"]
        dec = t["decode_tok_s"]
        kl = "-" if m["kl_vs_baseline"] is None else f"{m['kl_vs_baseline']:.4f}"
        top1 = "-" if m["top1_agreement_pct"] is None else f"{m['top1_agreement_pct']:.1f}%"
        lines.append(f"| {Path(r['name']).name} | {r['runtime']} | {_mb(m['weight_bytes'])} | {_mb(m['disk_bytes'])} "
                     f"| {m['perplexity']:.3f} | {kl} | {top1} | {m['ttft_s'] * 1000:.0f}{_x(r, 'ttft_s')} | "
                     f"{m['prefill_tok_s']:.0f} | {dec['median']:.1f}{_x(r, 'decode_tok_s')} "
                     f"({dec['min']:.1f}..{dec['max']:.1f}) | {_mb(m['peak_rss_bytes'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", default="/tmp/llmopt-llamacpp-bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-windows", type=int, default=4)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("LLMOPT_DATA"):
        raise SystemExit("set LLMOPT_DATA to the folder holding wiki.test.raw")
    files = make_files(args.model, work, args.threads)
    _llmopt("bench", args.model, str(files["gptq"]), str(files["f16"]), str(files["q4_0"]), str(files["q8_0"]),
            "--gguf-runtime", "llama.cpp", "--device", "cpu", "--prompt-len", "512", "--gen-len", "128",
            "--repeats", str(args.repeats), "--ppl-windows", str(args.ppl_windows), "--seq-len", "512",
            "--ppl-data", "wikitext2", "--json", threads=args.threads, out=work / "report.json")
    report = json.loads((work / "report.json").read_text())
    method = report["method"]
    print(table(report))
    print(f"\n{platform.processor() or platform.machine()}, {method['torch_threads']} threads (llama.cpp "
          f"{method['llama_cpp']['version']}: {method['llama_cpp']['threads']}), {method['ppl_data_description']}, "
          f"memory copy bandwidth {method['memory_bandwidth_gb_s']:.1f} GB/s; wall {report['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
