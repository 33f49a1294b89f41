"""Eager against compiled decode (`llmopt bench --compile`), same models, one process, interleaved rounds.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw python benchmarks/compiled_decode.py \
        smollm2-135m out/runtime-bench/smollm2-135m-gptq4

For each model given (the first is the baseline): load it as llmopt serves it (`--head auto`), compile
its decode step (`llmopt.compiled.warm_up`, timed: compile_s, from an empty inductor cache as a first
run has), count how many of its first greedy tokens equal eager decoding's (float rounding differs, so
a near-tie may flip), then time every (model, eager|compiled) pair in interleaved rounds over the same
wiki.test prompt (`llmopt.bench.speed.time_generation`, as `llmopt bench` does). Prints decode tok/s, the
ratio to the baseline's eager decode per round (median, min..max), and the break-even: how many generated
tokens the per-token saving needs to pay back compile_s. Prefill runs eagerly in both modes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# compile from scratch, as a first run does: inductor's on-disk cache would make a second run's compile faster
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch  # noqa: E402

from llmopt import compiled  # noqa: E402
from llmopt.attention import serve_attention  # noqa: E402
from llmopt.bench.speed import time_generation  # noqa: E402
from llmopt.data import load_text, random_windows, tokenize  # noqa: E402
from llmopt.models import load_model  # noqa: E402


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n: int, use_compiled: bool) -> list[int]:
    """n greedy tokens, eagerly (transformers' generate) or through the compiled step (static cache)."""
    if use_compiled:
        return compiled.greedy(model, prompt, n)
    ids = model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return ids[0, prompt.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model specs; the first is the baseline")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared eager vs compiled")
    args = ap.parse_args()
    print(f"# compiled decode {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, prompt {args.prompt_len}, "
          f"{args.gen_len} new tokens, {args.repeats} interleaved rounds")
    loaded = [load_model(spec, device="cpu", head="auto") for spec in args.models]
    text = load_text("auto", "eval").text
    prompts = [random_windows(tokenize(l.tokenizer, text[:200_000]), 1, args.prompt_len, 0) for l in loaded]
    compile_s, same = [], []
    for l, prompt in zip(loaded, prompts):
        serve_attention(l.model)
        compile_s.append(compiled.warm_up(l.model, prompt, args.gen_len))
        check = prompt[:, : min(64, args.prompt_len)]
        eager, comp = greedy(l.model, check, args.check_tokens, False), greedy(l.model, check, args.check_tokens, True)
        same.append(next((i for i, (a, b) in enumerate(zip(eager, comp)) if a != b), len(eager)))
    runs = [(i, mode) for i in range(len(loaded)) for mode in (False, True)]
    tok_s: dict[tuple, list[float]] = {r: [] for r in runs}
    for rnd in range(args.repeats + 1):                       # round 0 warms up, discarded
        for i, mode in (runs if rnd % 2 == 0 else runs[::-1]):
            t = time_generation(loaded[i].model, prompts[i], args.gen_len, compiled=mode)
            if rnd:
                tok_s[(i, mode)].append((args.gen_len - 1) / t.decode_s)
    base = tok_s[(0, False)]
    print("\n| model | decode | compile_s | decode tok/s | x baseline eager (min..max) | break-even tokens | "
          f"first greedy tokens equal (of {args.check_tokens}) |")
    print("|---|---|---|---|---|---|---|")
    for i, mode in runs:
        v = tok_s[(i, mode)]
        x = [a / b for a, b in zip(v, base)]
        eager = statistics.median(tok_s[(i, False)])
        rate = statistics.median(v)
        saving = 1 / eager - 1 / rate                         # seconds saved per token
        even = f"{compile_s[i] / saving:,.0f}" if mode and saving > 0 else ("never" if mode else "-")
        print(f"| {args.models[i]} | {'compiled' if mode else 'eager'} | {f'{compile_s[i]:.1f}' if mode else '-'} | "
              f"{rate:.1f} | {statistics.median(x):.2f}x ({min(x):.2f}..{max(x):.2f}) | {even} | "
              f"{same[i] if mode else '-'} |")


if __name__ == "__main__":
    main()
