"""Hidden-size pruning alone: what the channel importance and the RMSNorm compensation are worth.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \
        python benchmarks/prune_hidden.py --model smollm2-135m --hidden 552,504

Scores the residual channels on --nsamples calibration windows of wiki.valid.raw (as `llmopt prune`
does), then removes channels only (no heads, MLP channels or layers) to each --hidden size and
prints the mean loss on --windows held-out calibration windows for: the activation importance with
the norm compensation and the least-squares refit of the projections that read the stream (what
prune does), the same without the refit, without either, and seeded random channels with both.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch

from llmopt.data import text_windows
from llmopt.models import load_model
from llmopt.prune import hidden as hid
from llmopt.prune import slicing
from llmopt.prune.structure import arch_for, text_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hidden", default="552,504", help="comma-separated hidden sizes to keep")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
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
        slicing.forward_all(model, calib)
    h = text_config(model.config).hidden_size
    print(f"unpruned (hidden {h}): held-out loss {slicing.calibration_loss(model, held):.4f}", flush=True)
    scores = stats.scores()
    for size in (int(x) for x in args.hidden.split(",")):
        chosen = hid.keep_channels(scores, size)
        rand = hid.keep_channels(torch.rand(h, generator=torch.Generator().manual_seed(args.seed)), size)
        plain = copy.copy(stats)
        plain.grams = None
        for name, keep, using in (("activation importance, compensated, refit (prune)", chosen, stats),
                                  ("activation importance, compensated, no refit", chosen, plain),
                                  ("activation importance, neither", chosen, None),
                                  ("random channels, compensated, refit", rand, stats)):
            trial = copy.deepcopy(model)
            hid.apply(trial, arch, keep, using)
            print(f"hidden {size}: {name}: held-out loss {slicing.calibration_loss(trial, held):.4f}", flush=True)
            del trial


if __name__ == "__main__":
    main()
