"""Quality and speed of `llmopt prune` on a real model, every number printed here goes into docs/prune.md.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \
        python benchmarks/prune_bench.py --model smollm2-135m --ratio 0.2

Each variant is produced by the public `prune()` (calibrated on wiki.valid.raw), written to disk and
loaded back with plain `AutoModelForCausalLM.from_pretrained`, then scored on the first
--eval-windows 2048-token windows of wiki.test.raw (ablations on the first --ablation-windows, with
the original's perplexity on the same windows next to them). Windows follow llmopt bench's
convention (docs/bench.md): BOS first where the tokenizer adds one, and the prediction from BOS
alone is not scored. Speed: the original and the main
variant in the same process, interleaved rounds, a prefill of --prompt tokens and a greedy KV-cache
decode of --gen tokens; the ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llmopt.bench.quality import window_nll
from llmopt.bench.speed import next_step
from llmopt.data import load_windows
from llmopt.models import load_model
from llmopt.progress import Progress
from llmopt.prune import PruneOptions, hidden, prune


class Stages(Progress):
    """Prints each stage as it starts, with the time since the variant began."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def start(self, description: str, total: int | None = None) -> None:
        print(f"    [{time.time() - self.t0:5.0f}s] {description}", flush=True)

VARIANTS = {
    # name: (PruneOptions overrides, full evaluation?)
    "default": ({}, True),                         # every axis, the split measured
    "width only": ({"axes": "heads,mlp"}, True),   # what prune did before hidden and depth
    "hidden only": ({"axes": "hidden"}, False),
    "depth only": ({"axes": "depth"}, False),
    "no norm compensation": ({}, False),           # RMSNorm weights not rescaled after hidden pruning
    "taylor-obs": ({"axes": "heads,mlp"}, True),   # width pruning's importance methods, compared as before
    "taylor": ({"importance": "taylor", "axes": "heads,mlp"}, True),
    "obs": ({"importance": "obs", "axes": "heads,mlp"}, True),
    "l2": ({"importance": "l2", "axes": "heads,mlp"}, True),
    "random": ({"importance": "random", "axes": "heads,mlp"}, True),
    "taylor-obs, no reconstruction": ({"reconstruct": False, "axes": "heads,mlp"}, False),
    "taylor-obs, MLP only": ({"split": "mlp", "axes": "heads,mlp"}, False),
    "taylor, no reconstruction": ({"importance": "taylor", "reconstruct": False, "axes": "heads,mlp"}, False),
    "taylor2": ({"importance": "taylor2", "axes": "heads,mlp"}, False),
}


def ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


@torch.inference_mode()
def time_once(model, prompt: torch.Tensor, gen: int) -> tuple[float, float]:
    """Seconds for a prefill of the prompt and for `gen` greedy decode steps with the KV cache."""
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    t1 = time.perf_counter()
    token = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    for _ in range(gen):
        out = model(input_ids=token, use_cache=True, **next_step(out))
        token = out.logits[:, -1:].argmax(-1)
    return t1 - t0, time.perf_counter() - t2


def speed(models: dict, prompt: torch.Tensor, gen: int, rounds: int) -> dict:
    names = list(models)
    for m in models.values():           # warm-up
        time_once(m, prompt[:, :32], 4)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(time_once(models[n], prompt, gen))
    base = names[0]
    out = {}
    for n in names:
        pre = statistics.median(times[base][i][0] / times[n][i][0] for i in range(rounds))
        dec = statistics.median(times[base][i][1] / times[n][i][1] for i in range(rounds))
        out[n] = {"prefill_tok_s": prompt.shape[1] / statistics.median(t[0] for t in times[n]),
                  "decode_tok_s": gen / statistics.median(t[1] for t in times[n]),
                  "prefill_speedup": pre, "decode_speedup": dec}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=PruneOptions.nsamples)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--ablation-windows", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--extra", action="append", default=[], help="extra PruneOptions for every variant, k=v")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="/tmp/llmopt-prune-bench")
    args = ap.parse_args()
    extra = {}
    for kv in args.extra:
        k, v = kv.split("=", 1)
        extra[k] = type(getattr(PruneOptions("m", "o"), k))(v) if not isinstance(getattr(PruneOptions("m", "o"), k),
                                                                                  bool) else v == "true"

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; python {' '.join(sys.argv)}", flush=True)
    base = load_model(args.model, device="cpu")
    windows = load_windows(base.tokenizer, "wikitext2", "eval", 2048, max_windows=args.eval_windows)
    desc = windows.description
    print(f"# eval: {len(windows)} windows x 2048 of {desc}", flush=True)
    t = time.time()
    base_nll = window_nll(base.model, windows)
    n_abl = min(args.ablation_windows, len(windows))
    print(f"original: ppl {ppl(base_nll):.3f} ({len(windows)} windows), {ppl(base_nll[:n_abl]):.3f} "
          f"(first {n_abl}) [{time.time() - t:.0f}s]", flush=True)

    rows = []
    main_dir = None
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        overrides, full = VARIANTS[name]
        out = Path(args.work) / name.replace(", ", "-").replace(" ", "_")
        t = time.time()
        opts = PruneOptions(args.model, str(out), ratio=args.ratio, nsamples=args.nsamples, seq_len=args.seq_len,
                            calib="wikitext2", device="cpu", force=True, **{**extra, **overrides})
        plain = hidden.HiddenStats.compensation
        if "no norm compensation" in name:
            hidden.HiddenStats.compensation = lambda self, norm, keep, h: 1.0
        try:
            s = prune(opts, Stages())
        finally:
            hidden.HiddenStats.compensation = plain
        took = time.time() - t
        model = AutoModelForCausalLM.from_pretrained(out).eval()   # plain transformers
        w = windows if full else windows.part(slice(0, n_abl))
        nll = window_nll(model, w)
        ref = ppl(base_nll[: len(w)])
        wa = s["widths_after"]
        row = (f"{name}: ppl {ppl(nll):.3f} on {len(w)} windows ({ppl(nll) / ref:.3f}x original {ref:.3f}); "
               f"removed {s['ratio_achieved']:.2%} of all parameters ({s['parameters_before']:,} -> "
               f"{s['parameters_after']:,}), {s['decoder_ratio_achieved']:.2%} of decoder layers; "
               f"hidden {s['hidden_after']}, {s['layers_after']} layers (removed {s['layers_removed']}), "
               f"{wa['heads']} heads / {wa['kv_heads']} kv / intermediate {wa['intermediate']}; "
               f"by axis {s['parameters_removed_by_axis']}; "
               f"calib loss {s['calibration_loss_before']:.3f} -> {s['calibration_loss_after']:.3f}; "
               f"prune {took:.0f}s")
        print(row, flush=True)
        for c in s["plans_tried"]:
            print(f"    {c['stage']:6s} hidden {c['hidden']:5d} layers {c['layers']:3d} "
                  f"{c['heads']}h/{c['kv_heads']}kv/{c['intermediate']}: {c['parameters']:,} parameters, "
                  f"held-out loss {c['calibration_loss']:.3f}", flush=True)
        rows.append(row)
        if main_dir is None:
            main_dir = out
        del model
        gc.collect()

    if main_dir is not None and args.rounds > 0:
        pruned = AutoModelForCausalLM.from_pretrained(main_dir).eval()
        ids = windows.ids[-1:, : args.prompt]
        res = speed({"original": base.model, "pruned": pruned}, ids, args.gen, args.rounds)
        n0 = sum(p.numel() for p in base.model.parameters())
        n1 = sum(p.numel() for p in pruned.parameters())
        p = res["pruned"]
        print(f"speed ({main_dir.name} vs original, {args.rounds} interleaved rounds, prefill {args.prompt} tokens, "
              f"decode {args.gen} tokens): prefill {p['prefill_speedup']:.3f}x, decode {p['decode_speedup']:.3f}x; "
              f"parameters {n1 / n0:.3f}x of the original ({n0:,} -> {n1:,}); "
              f"original {res['original']['prefill_tok_s']:.0f} / {res['original']['decode_tok_s']:.1f} tok/s, "
              f"pruned {p['prefill_tok_s']:.0f} / {p['decode_tok_s']:.1f} tok/s (prefill / decode)", flush=True)


if __name__ == "__main__":
    main()
