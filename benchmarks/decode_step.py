"""What llmopt's own decode step (llmopt.decode_step) saves per token against the model's own forward.

    OMP_WAIT_POLICY=passive python benchmarks/decode_step.py smollm2-135m out/runtime-bench/smollm2-135m-gptq4

Each model is loaded as `generate` and `bench` serve it (CPU, float32 activations, `--head auto`, llmopt's
attention), its prompt (random token ids, `--prompt-len`) prefilled into llmopt's growing cache; then in
interleaved rounds (the order alternating) each model decodes `--steps` greedy-free steps of the same token
through transformers' forward and through `decode_step.step`, each block on a fresh copy of the prompt's
cache. Prints milliseconds per step (median over rounds), the saving, and the decode speed ratio of
every model to the first one under each path: the step serves every model, so what matters for bench's
ratios is how it moves both sides. Also checks that both paths give the same logits, bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from llmopt import decode_step, kv_cache
from llmopt.attention import serve_attention
from llmopt.models import load_model


def prepared(name: str, prompt_len: int):
    model = load_model(name, device="cpu", dtype="float32", tokenizer=False, head="auto").model
    serve_attention(model)
    if not decode_step.supported(model):
        raise SystemExit(f"{name}: llmopt's decode step does not serve this model")
    ids = torch.randint(100, 20000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    key = kv_cache.cache_keyword(model)
    cache = kv_cache.growing_cache(model)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache})
    return model, key, cache, out.logits[:, -1:].argmax(-1)


def block(model, key: str, cache, token: torch.Tensor, steps: int, served: bool) -> tuple[float, torch.Tensor]:
    """Milliseconds per step over `steps` decode steps from the prompt (on a copy of its cache); the first
    step's logits."""
    cache = copy.deepcopy(cache)
    first = None
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(steps):
            logits = decode_step.step(model, token, cache) if served else \
                model(input_ids=token, use_cache=True, **{key: cache}).logits
            first = logits if first is None else first
        ms = (time.perf_counter() - start) / steps * 1e3
    return ms, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="the first is the reference of the ratios")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    models = [prepared(m, args.prompt_len) for m in args.models]
    times = {(m, s): [] for m in args.models for s in (False, True)}
    for r in range(args.rounds + 1):                          # round 0 warms up
        order = list(zip(args.models, models))
        for name, (model, key, cache, token) in order if r % 2 == 0 else reversed(order):
            results = {}
            for served in ((False, True) if r % 2 == 0 else (True, False)):
                results[served] = block(model, key, cache, token, args.steps, served)
                if r:
                    times[(name, served)].append(results[served][0])
            if r == 0 and not torch.equal(results[False][1], results[True][1]):
                raise SystemExit(f"{name}: the two paths gave different logits")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {args.prompt_len}, "
          f"{args.steps} steps x {args.rounds} interleaved rounds; logits equal bit for bit")
    ref = args.models[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'model':45} {'forward ms':>11} {'step ms':>8} {'saved':>7} {'x ref (forward)':>16} {'x ref (step)':>13}")
    for name in args.models:
        f, s = med[(name, False)], med[(name, True)]
        print(f"{name:45} {f:11.1f} {s:8.1f} {1 - s / f:7.0%} {med[(ref, False)] / f:15.2f}x "
              f"{med[(ref, True)] / s:12.2f}x")


if __name__ == "__main__":
    main()
