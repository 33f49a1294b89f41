"""Decode speed of llmopt's runtime against llama.cpp, each in processes of its own, under several settings.

    pip install 'llmopt[llamacpp]'
    python benchmarks/decode_vs_llamacpp.py original=smollm2-135m:2:passive \
        llmopt=out/runtime-bench/smollm2-135m-gptq4:2:passive \
        llmopt-compiled=out/runtime-bench/smollm2-135m-gptq4:2:passive:compiled \
        q4_0-1t=/tmp/gguf/q4_0.gguf:1:default q4_0-2t=/tmp/gguf/q4_0.gguf:2:default \
        q4_0-2t-passive=/tmp/gguf/q4_0.gguf:2:passive q8_0-2t=/tmp/gguf/q8_0.gguf:2:default --rounds 5

Each argument is LABEL=MODEL:THREADS:WAIT[:compiled]. WAIT is OpenMP's wait policy: passive, active,
default (OMP_WAIT_POLICY unset, as `llmopt bench` times llama.cpp), or spinN (unset, and GNU OpenMP's
GOMP_SPINCOUNT=N: a waiting thread spins N times, then sleeps). MODEL is a .gguf
file, run by llama.cpp (llama-cpp-python), or anything `llmopt.models.load_model` reads, run by llmopt's
runtime as `llmopt bench` runs it (float32 activations, `--head auto`, llmopt's cache, decode step and
attention; `:compiled`: as `bench --compile` runs it, compiled in the process first). `bench` gives
llama.cpp one setting (torch's thread count, OpenMP's default waiting); this script compares thread counts
and wait policies side by side. Every round starts one fresh process per model, in an order that alternates
between rounds; each process prefills the same random 512-token prompt, decodes 16 tokens to warm up (a
compiled one: its compiling run), then times a prefill and `--gen-len` greedy tokens. Prints tokens/s per
model (median, range) and, round by round, each model's decode speed over the first model's and over the
fastest llama.cpp one's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass


WAITS = ("passive", "active", "default")     # default: OMP_WAIT_POLICY unset (how bench times llama.cpp)


def _wait_ok(wait: str) -> bool:
    return wait in WAITS or (wait.startswith("spin") and wait[4:].isdigit())


@dataclass
class Config:
    label: str
    model: str
    threads: int
    wait: str
    compiled: bool = False

    @classmethod
    def parse(cls, text: str) -> "Config":
        label, _, rest = text.partition("=")
        fields = rest.split(":")
        compiled = fields[-1] == "compiled"
        fields = fields[:-1] if compiled else fields
        model, threads, wait = ":".join(fields[:-2]), fields[-2] if len(fields) > 2 else "", fields[-1]
        if not _wait_ok(wait) or not label or not model or not threads.isdigit() or \
                (compiled and model.endswith(".gguf")):
            raise SystemExit(f"bad model argument {text!r}: want LABEL=MODEL:THREADS:passive|active|default|spinN[:compiled] "
                             "(compiled: llmopt models only)")
        return cls(label, model, int(threads), wait, compiled)

    @property
    def llamacpp(self) -> bool:
        return self.model.endswith(".gguf")


def worker(model_spec: str, prompt_len: int, gen_len: int, compile_step: bool) -> None:
    """One timed generation in this process; prints its figures as JSON."""
    import torch

    from llmopt import compiled
    from llmopt.attention import serve_attention
    from llmopt.bench.speed import time_generation

    if model_spec.endswith(".gguf"):
        from llmopt.bench.llamacpp import load_llamacpp

        model = load_llamacpp(model_spec, prompt_len + gen_len, tokenizer=False).model
    else:
        from llmopt.models import load_model

        model = load_model(model_spec, device="cpu", dtype="float32", tokenizer=False, head="auto").model
    prompt = torch.randint(100, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    if compile_step:              # the graph is for one cache length, so the warm-up decodes as many tokens
        serve_attention(model)
        compiled.warm_up(model, prompt, gen_len)
    else:
        time_generation(model, prompt, 16)
    t = time_generation(model, prompt, gen_len, compile_step)
    print(json.dumps({"decode_tok_s": t.decode_tok_s, "prefill_tok_s": t.prefill_tok_s,
                      "threads": torch.get_num_threads()}))


def run_one(cfg: Config, prompt_len: int, gen_len: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(cfg.threads)
    if cfg.wait.startswith("spin"):
        env["GOMP_SPINCOUNT"] = cfg.wait[4:]
    elif cfg.wait != "default":
        env["OMP_WAIT_POLICY"] = cfg.wait
    done = subprocess.run([sys.executable, __file__, "--worker", cfg.model, "--prompt-len", str(prompt_len),
                           "--gen-len", str(gen_len)] + (["--compiled"] if cfg.compiled else []),
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{cfg.label} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _range(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def report(configs: list[Config], rounds: list[dict[str, dict]]) -> None:
    best = [max((r[c.label]["decode_tok_s"] for c in configs if c.llamacpp), default=None) for r in rounds]
    first = configs[0].label
    print(f"| model | runtime | threads | OpenMP wait | prefill tok/s | decode tok/s | decode x {first} "
          "| decode x fastest llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        decode = [r[c.label]["decode_tok_s"] for r in rounds]
        prefill = [r[c.label]["prefill_tok_s"] for r in rounds]
        over_first = [d / r[first]["decode_tok_s"] for d, r in zip(decode, rounds)]
        over_best = [d / b for d, b in zip(decode, best)] if None not in best else []
        runtime = "llama.cpp" if c.llamacpp else "llmopt, compiled" if c.compiled else "llmopt"
        print(f"| {c.label} | {runtime} | {c.threads} | {c.wait} "
              f"| {_range(prefill, 0)} | {_range(decode)} | {_range(over_first, 2)}x "
              f"| {_range(over_best, 2) + 'x' if over_best else '-'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="LABEL=MODEL:THREADS:passive|active|default|spinN[:compiled]; the first "
                                              "is the reference")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.prompt_len, args.gen_len, args.compiled)
        return
    configs = [Config.parse(m) for m in args.models]
    if len(configs) < 2:
        raise SystemExit("give at least two models")
    rounds: list[dict[str, dict]] = []
    for i in range(args.rounds):
        order = configs if i % 2 == 0 else configs[::-1]
        rounds.append({c.label: run_one(c, args.prompt_len, args.gen_len) for c in order})
        print(f"round {i + 1}: " + ", ".join(f"{c.label} {rounds[-1][c.label]['decode_tok_s']:.1f}"
                                             for c in configs), file=sys.stderr, flush=True)
    report(configs, rounds)


if __name__ == "__main__":
    main()
