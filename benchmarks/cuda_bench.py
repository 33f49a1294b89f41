"""The CUDA table of docs/runtime.md: GPTQ 4-bit against bfloat16 on a random model of Llama-3.2-1B's shapes.

    python benchmarks/cuda_bench.py --tokenizer TOKENIZER_DIR --out out/cuda-bench
    python benchmarks/cuda_bench.py --tokenizer DIR --out /tmp/cb --smoke --device cpu     # a quick check

Speed does not depend on weight values, so the model is built from Llama-3.2-1B's config (16 layers,
hidden 2048, MLP 8192, 32 query / 8 key-value heads, vocabulary 128256, tied head) with random weights,
and any tokenizer serves for the prompt (its ids are below the vocabulary size). Steps, each timed:
1. save the bf16 model; `llmopt quantize --method gptq` on the GPU (builtin calibration text);
2. the int4 Linear against bf16 `F.linear` per layer shape and number of rows: tinygemm's kernel and the
   dequantize + cuBLAS path, which sets `CUDA_DEQUANT_MIN_ROWS` (llmopt/quantize/qlinear.py);
3. `llmopt bench` (one process, interleaved rounds): eager, then `--compile` (CUDA graphs), then
   `--compile --head int4`. The bench reports go to OUT/bench-*.json, and a summary is printed.
Results and what they mean: docs/runtime.md, "CUDA".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmopt.quantize.qlinear import QuantLinear

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
SMOKE = dict(LLAMA_1B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152)
ROWS = (1, 16, 64, 128, 256, 512)


def build(out: Path, tokenizer: str, config: dict, device: str) -> float:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return time.perf_counter() - start


def llmopt(*args: str) -> float:
    print("$ llmopt " + " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmopt", *args], check=True)
    return time.perf_counter() - start


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of one call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_table(config: dict, device: torch.device, reps: int) -> list[dict]:
    """Each Linear shape of the model: bf16 F.linear, the int4 kernel and dequantize + GEMM, per row count."""
    h, i, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    shapes = {"q/o": (config["num_attention_heads"] * hd, h), "k/v": (config["num_key_value_heads"] * hd, h),
              "gate/up": (i, h), "down": (h, i), "head": (config["vocab_size"], h)}
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in shapes.items():
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        scales = torch.rand(k // 128, n, generator=gen) * 0.01
        layer = QuantLinear(q, torch.full_like(scales, 8, dtype=torch.int32), scales, torch.arange(k) // 128, None,
                            4, 128, device=device)
        dense = layer.dequantized_weight(torch.bfloat16).contiguous()
        for m in ROWS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            t_bf16 = _time(lambda: F.linear(x, dense), device, reps)
            t_kernel = _time(lambda: layer.forward_kernel(x), device, reps)
            t_deq = _time(lambda: layer.forward_dequant(x), device, reps)
            rows_out.append(dict(layer=name, n=n, k=k, rows=m, bf16_us=t_bf16 * 1e6, kernel_us=t_kernel * 1e6,
                                 dequant_us=t_deq * 1e6, cheap_dequant=layer.cheap_dequant))
            print(f"{name:8s} {n:6d}x{k:<5d} M={m:<4d} bf16 {t_bf16 * 1e6:8.1f} us  int4 kernel "
                  f"{t_kernel * 1e6:8.1f} us ({t_bf16 / t_kernel:4.2f}x)  dequant+GEMM {t_deq * 1e6:8.1f} us "
                  f"({t_bf16 / t_deq:4.2f}x)", flush=True)
        del layer, dense
    return rows_out


def summary(report: dict) -> dict:
    base, quant = report["models"][0]["metrics"], report["models"][1]["metrics"]
    keys = ("decode_tok_s", "prefill_tok_s", "ttft_s", "peak_cuda_allocated_bytes", "compile_s")
    out = {f"{k}_{who}": m.get(k) for k in keys for who, m in (("bf16", base), ("int4", quant))}
    deltas = report["models"][1]["deltas"]
    out.update({f"{k}_x": deltas[k]["x"] for k in ("decode_tok_s", "prefill_tok_s", "weight_bytes") if k in deltas})
    out["weight_bandwidth_pct_int4"] = quant.get("weight_bandwidth_pct")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="Any tokenizer directory or hub id.")
    ap.add_argument("--out", type=Path, default=Path("out/cuda-bench"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="A 2-layer model of the same kind, for a quick check.")
    ap.add_argument("--stages", default="kernels,eager,compile,compile-int4",
                    help="Comma-separated steps after quantizing: kernels, eager, compile, compile-int4.")
    args = ap.parse_args()
    config, device, stages = SMOKE if args.smoke else LLAMA_1B, torch.device(args.device), args.stages.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    base, quant = args.out / "llama-1b-shape", args.out / "llama-1b-shape-gptq4"
    facts: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__}
    if not (base / "config.json").is_file():
        facts["build_s"] = build(base, args.tokenizer, config, args.device)
    for method in ("gptq", "rtn"):      # rtn (same layout, same speed) only if gptq failed, and said so
        if not (quant / "llmopt.json").is_file():
            try:
                facts[f"quantize_{method}_s"] = llmopt(
                    "quantize", str(base), "-o", str(quant), "--method", method, "--device", args.device,
                    *(["--calib", "builtin", "--nsamples", str(args.nsamples), "--seq-len", "512"]
                      if method == "gptq" else []))
            except subprocess.CalledProcessError as e:
                facts[f"quantize_{method}_failed"] = str(e)
    print(json.dumps(facts), flush=True)
    summary_path = args.out / "cuda-bench.json"
    if "kernels" in stages:
        facts["kernels"] = kernel_table(config, device, reps=30)
        summary_path.write_text(json.dumps(facts, indent=1))
    runs = {"eager": [], "compile": ["--compile"], "compile-int4": ["--compile", "--head", "int4"]}
    for stage, extra in runs.items():
        if stage not in stages:
            continue
        path = args.out / f"bench-{stage}.json"
        cmd = ["bench", str(quant), "--baseline", str(base), "--device", args.device, "--skip-quality",
               "--repeats", str(args.repeats), "--json", *extra] + (["--no-memory"] if stage != "eager" else [])
        print("$ llmopt " + " ".join(cmd), flush=True)
        done = subprocess.run([sys.executable, "-m", "llmopt", *cmd], stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"{stage}: exit {done.returncode}", flush=True)
            continue
        path.write_text(done.stdout)
        facts[stage] = summary(json.loads(done.stdout))
        print(stage, json.dumps(facts[stage]), flush=True)
        summary_path.write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
