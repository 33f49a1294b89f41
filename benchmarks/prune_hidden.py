"""Hidden-size pruning alone: what the channel importance, the refit and the RMSNorm compensation are worth.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \
        python benchmarks/prune_hidden.py --model smollm2-135m --hidden 552,504

Scores the residual channels on --nsamples calibration windows of wiki.valid.raw (as `llmopt prune`
does, one forward/backward pass each), then removes channels only (no heads, MLP channels or layers)
to each --hidden size and prints the mean loss on --windows held-out calibration windows for: the
Taylor importance with the norm compensation and the least-squares refit of the projections that
read the stream (what prune does), the activation importance with both (what prune did before, and
still does with a gradient-free --importance), the activation importance without the refit and
without either, and --seeds seeded draws of random channels with both. With --eval-windows N, also
the perplexity on the first N 2048-token windows of wiki.test.raw (llmopt bench's convention): the
held-out windows are short and from the calibration text, the evaluation is neither.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time

import torch

from llmopt.bench.quality import window_nll
from llmopt.data import load_windows, text_windows
from llmopt.models import load_model
from llmopt.prune import hidden as hid
from llmopt.prune import importance as imp
from llmopt.prune import slicing
from llmopt.prune.structure import arch_for, geometry, text_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hidden", default="552,504", help="comma-separated hidden sizes to keep")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=3, help="random draws of channels")
    ap.add_argument("--eval-windows", type=int, default=0, help="wiki.test.raw windows of 2048 tokens (0: none)")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; python {' '.join(sys.argv)}", flush=True)
    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    arch = arch_for(text_config(model.config))
    calib, _ = text_windows(tok, "wikitext2", "calib", args.seq_len, nsamples=args.nsamples, seed=args.seed)
    held, _ = text_windows(tok, "wikitext2", "calib", args.seq_len, nsamples=args.windows, seed=args.seed + 7919)
    stats = hid.HiddenStats(grams=True)
    with stats.capture(model, arch):
        layers, _ = imp.gradient_scores(model, arch, geometry(model.config, arch), calib)
    taylor = torch.stack([s.hidden for s in layers]).sum(0)
    h = text_config(model.config).hidden_size
    evals = load_windows(tok, "wikitext2", "eval", 2048, max_windows=args.eval_windows) if args.eval_windows else None

    def scored(m: torch.nn.Module) -> str:
        text = f"held-out loss {slicing.calibration_loss(m, held):.4f}"
        return text + (f", wiki.test perplexity {math.exp(window_nll(m, evals).mean().item()):.3f}" if evals else "")

    print(f"unpruned (hidden {h}): {scored(model)}", flush=True)
    plain = copy.copy(stats)
    plain.grams = None
    for size in (int(x) for x in args.hidden.split(",")):
        active = hid.keep_channels(stats.scores(), size)
        runs = [("Taylor importance, compensated, refit (prune)", hid.keep_channels(taylor, size), stats),
                ("activation importance, compensated, refit", active, stats),
                ("activation importance, compensated, no refit", active, plain),
                ("activation importance, neither", active, None)]
        for k in range(args.seeds):
            draw = torch.rand(h, generator=torch.Generator().manual_seed(args.seed + k))
            runs.append((f"random channels (seed {args.seed + k}), compensated, refit", hid.keep_channels(draw, size),
                         stats))
        for name, keep, using in runs:
            trial = copy.deepcopy(model)
            hid.apply(trial, arch, keep, using)
            print(f"hidden {size}: {name}: {scored(trial)}", flush=True)
            del trial


if __name__ == "__main__":
    main()
