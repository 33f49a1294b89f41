"""Where one decode step's time goes: torch.profiler over decode steps of a model as llmopt serves it.

    OMP_WAIT_POLICY=passive python benchmarks/decode_profile.py out/runtime-bench/smollm2-135m-gptq4
    python benchmarks/decode_profile.py smollm2-135m --head full --steps 20 --prompt-len 512

Loads MODEL with `llmopt.models.load_model` (CPU, float32, `--head`), prefills a random prompt with
llmopt's growing KV cache, runs a few decode steps to warm up, then profiles `--steps` more and prints
the operators by self CPU time, with each one's share of the total.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from llmopt.kv_cache import cache_kwargs
from llmopt.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--head", default="auto")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    model = load_model(args.model, device="cpu", dtype="float32", tokenizer=False, head=args.head).model
    ids = torch.randint(100, 20000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = cache_kwargs(model)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(5):
            model(input_ids=token, use_cache=True, logits_to_keep=1, **cache)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                model(input_ids=token, use_cache=True, logits_to_keep=1, **cache)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.model} (--head {args.head}), {torch.get_num_threads()} threads: "
          f"{total / args.steps / 1e3:.2f} ms of operator time per decode step")
    for e in events[: args.rows]:
        print(f"{e.key[:48]:48} {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"{e.count // args.steps:5d} calls/step  {e.self_cpu_time_total / e.count:8.1f} us/call")


if __name__ == "__main__":
    main()
