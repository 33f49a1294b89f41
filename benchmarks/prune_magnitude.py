"""Is any weight-magnitude score better than random at choosing MLP channels to prune?

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \\
        python benchmarks/prune_magnitude.py [--model smollm2-135m] [--widths 9/3/1016]

`--importance l2` ranks a channel by the squared weights of its gate row, up row and down column.
This script compares it with two other data-free magnitudes and with random scores, all removing
the same number of channels per layer (the widths `llmopt prune --ratio 0.2` picks for l2 and random
on SmolLM2-135M), with and without the least-squares refit `llmopt prune` applies:

- `sum of squares`: the shipped l2, ||g||^2 + ||u||^2 + ||d||^2;
- `norm folded`: the same with the pre-MLP RMSNorm weight folded into the gate and up rows, the
  weights the normalised input actually meets;
- `product of norms`: ||g|| * ||u|| * ||d||, unchanged when a row is scaled up and its column down;
- `product, norm folded`: both.

Printed: the mean loss on 8 held-out calibration windows (the loss `--split auto` compares). Random
scores are drawn with --seeds seeds, so one lucky draw cannot decide the comparison: their mean and
range are printed, and each magnitude's standing against every seed.
"""

from __future__ import annotations

import argparse
import time

import torch

from llmopt.data import text_windows
from llmopt.models import load_model
from llmopt.prune import importance as imp
from llmopt.prune import slicing
from llmopt.prune.structure import Widths, arch_for, decoder_layers, geometry, module, text_config


def norm_scale(layer: torch.nn.Module) -> torch.Tensor:
    """The per-feature scale the RMSNorm before the MLP applies (Gemma stores it as 1 + w)."""
    norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
    w = norm.weight.detach().float()
    return 1 + w if "Gemma" in type(norm).__name__ else w


def magnitude(model, arch, geo, folded: bool, product: bool) -> list[imp.LayerScores]:
    out = []
    for layer, s in zip(decoder_layers(model), imp.weight_scores(model, arch, geo)):
        g, u = (module(layer, n).weight.detach().float() for n in arch.mlp_in)
        d = module(layer, arch.mlp_out).weight.detach().float()
        if folded:
            scale = norm_scale(layer)
            g, u = g * scale, u * scale
        ng, nu, nd = g.norm(dim=1), u.norm(dim=1), d.norm(dim=0)
        out.append(imp.LayerScores(s.q, s.kv, ng * nu * nd if product else ng ** 2 + nu ** 2 + nd ** 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--widths", default="9/3/1016", help="heads/kv_heads/intermediate kept in every layer")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5, help="random-score draws")
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    arch = arch_for(text_config(model.config))
    geo = geometry(model.config, arch)
    widths = Widths(*(int(x) for x in args.widths.split("/")))
    windows, _ = text_windows(tok, "wikitext2", "calib", 512, nsamples=args.nsamples, seed=0)
    held_out, _ = text_windows(tok, "wikitext2", "calib", 512, nsamples=8, seed=7919)   # as llmopt prune
    grams = slicing.Grams()
    t = time.time()
    with grams.capture(model, arch):
        slicing.forward_all(model, windows)
    print(f"# {args.model}, {args.nsamples} x 512 calibration tokens ({time.time() - t:.0f}s); keeping "
          f"{widths.describe()} per layer", flush=True)
    print(f"unpruned: held-out loss {slicing.calibration_loss(model, held_out):.4f}", flush=True)

    def held_out_losses(scores: list[imp.LayerScores]) -> tuple[float, float]:
        keeps = slicing.choose(scores, geo, widths)
        with slicing.masked(model, arch, geo, keeps, grams):
            refit = slicing.calibration_loss(model, held_out)
        with slicing.masked(model, arch, geo, keeps, None):
            plain = slicing.calibration_loss(model, held_out)
        return refit, plain

    randoms = [held_out_losses(imp.random_scores(geo, seed)) for seed in range(args.seeds)]
    for k, what in ((0, "with the refit"), (1, "without")):
        vals = [r[k] for r in randoms]
        print(f"random ({args.seeds} seeds), {what}: mean {sum(vals) / len(vals):.4f}, "
              f"range {min(vals):.4f}..{max(vals):.4f}", flush=True)
    variants = {
        "sum of squares (--importance l2)": imp.weight_scores(model, arch, geo),
        "norm folded": magnitude(model, arch, geo, folded=True, product=False),
        "product of norms": magnitude(model, arch, geo, folded=False, product=True),
        "product, norm folded": magnitude(model, arch, geo, folded=True, product=True),
    }
    for name, scores in variants.items():
        refit, plain = held_out_losses(scores)
        beats = [sum(loss < r[k] for r in randoms) for k, loss in enumerate((refit, plain))]
        print(f"{name}: held-out loss {refit:.4f} with the refit, {plain:.4f} without; better than "
              f"{beats[0]}/{args.seeds} and {beats[1]}/{args.seeds} random draws", flush=True)


if __name__ == "__main__":
    main()
