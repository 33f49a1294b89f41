"""One-shot against sequential least-squares refit, on the same pruned structures.

    OMP_WAIT_POLICY=passive LLMOPT_DATA=/path/to/wikitext-2-raw \
        python benchmarks/prune_refit.py --model smollm2-135m --widths 6/3/1144

Scores heads, KV groups and MLP channels as `llmopt prune --axes heads,mlp` does (--importance on
--nsamples windows of --seq-len tokens from wiki.valid.raw, seed 0), keeps the same structures per
layer for the --widths given (heads / KV heads / intermediate: the shape prune chose), and refits
o_proj / down_proj two ways: one-shot (`slicing.reconstruct`, the Grams of the original model; what
prune does) and sequential (`apply_sequential` below, layer by layer on the pruned model's own
inputs, the same calibration windows; --targets and --damps choose which sequential variants run).
Prints the loss on prune's 8 held-out calibration windows and
the perplexity on the first --eval-windows 2048-token windows of wiki.test.raw (llmopt bench's
convention), each model evaluated in memory in the dtype prune writes.

The sequential refit is not part of `llmopt prune`: it measured worse (docs/prune.md). The one-shot refit (`slicing.reconstruct`) matches each projection's output on the inputs the ORIGINAL
model gives it. Once earlier layers are pruned, the inputs the pruned layer actually sees differ, and
the errors of the layers before it are left for nobody to absorb. Here (as SparseGPT / ZipLM do)
layer i is refit after layers 0..i-1 are pruned and refit: with X the original projection inputs
(the original layer on the original stream) and X' the pruned one's (the pruned layer on the pruned
stream, o_proj first, so down_proj sees the refit attention), the kept columns solve

    min ||X W^T - X'_K W_K'^T||^2 + lam ||W_K' - W_K||^2
    W_K' = W_K + (W C - W_K G') (G' + lam I)^-1,   C = X^T X'_K,  G' = X'_K^T X'_K

with `lam` as in `reconstruct` (a fraction of G's mean diagonal). When X' = X this is exactly the
one-shot refit, and when nothing is cut it is exactly W (tests/test_prune_refit.py). `--targets pruned`
replaces X by the original layer's input on the PRUNED stream (SparseGPT's target, W x'). Memory: the residual stream of every
calibration window twice (original and pruned), one layer's copy and one (in x kept) cross-Gram at a
time.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import platform
import sys
import time

import torch

from llmopt.bench.quality import window_nll
from llmopt.data import load_windows, text_windows
from llmopt.models import load_model, model_device
from llmopt.prune import SELECTION_WINDOWS, PruneOptions, build, measure, slicing
from llmopt.prune.plan import Shape
from llmopt.prune.structure import Arch, Geometry, Widths, arch_for, decoder_layers, geometry, module, text_config
from llmopt.quantize.sequential import capture_inputs


class _Stop(Exception):
    """Cuts a layer's forward short once the projection's input is captured."""


class CrossGram:
    """sum x x'^T (original input x, pruned input x' over the kept columns) and sum x' x'^T, in fp32."""

    def __init__(self) -> None:
        self.cross: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor, xp: torch.Tensor) -> None:
        x, xp = x.reshape(-1, x.shape[-1]).float(), xp.reshape(-1, xp.shape[-1]).float()
        c, g = x.T @ xp, xp.T @ xp
        self.cross = c if self.cross is None else self.cross.add_(c)
        self.gram = g if self.gram is None else self.gram.add_(g)


def refit(weight: torch.Tensor, acc: CrossGram, keep: torch.Tensor,
          damp: float = slicing.RECONSTRUCT_DAMP) -> torch.Tensor:
    """The kept columns of `weight` refit so W'_K x'_K best matches W x (ridge toward W_K)."""
    w = weight.float()
    w_k = w[:, keep.to(w.device)]
    g = acc.gram.to(w.device)
    rhs = w @ acc.cross.to(w.device) - w_k @ g
    lam = damp * g.diagonal().mean().clamp_min(1e-8)
    chol, info = torch.linalg.cholesky_ex(g + lam * torch.eye(g.shape[0], device=w.device))
    if int(info) == 0:
        delta = torch.cholesky_solve(rhs.T, chol).T
    else:  # pragma: no cover - the ridge term makes G' positive definite in practice
        delta = torch.linalg.lstsq(g + lam * torch.eye(g.shape[0], device=w.device), rhs.T).solution.T
    return (w_k + delta).to(weight.dtype)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _input_of(layer: torch.nn.Module, name: str, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """The input of `layer`'s submodule `name` when the layer runs on `h` (the rest is not computed)."""
    seen = []

    def pre(_mod, args):
        seen.append(args[0])
        raise _Stop

    handle = module(layer, name).register_forward_pre_hook(pre)
    try:
        layer(h, **kw)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _refit_layer(original: torch.nn.Module, layer: torch.nn.Module, arch: Arch, geo: Geometry, keep: slicing.Keep,
                 h: torch.Tensor, hp: torch.Tensor, kw: dict, target: str, damp: float) -> None:
    """Refit o_proj, then down_proj, of the (already sliced) `layer`; then advance both streams in place.
    target "original": match W x, x the original layer's input on the original stream; "pruned": match W x'
    with x' from the original layer on the pruned stream (SparseGPT's target)."""
    for name, cols in ((arch.o, slicing._expand(keep.q_heads, geo.head_dim)), (arch.mlp_out, keep.channels)):
        acc = CrossGram()
        src = h if target == "original" else hp
        for j in range(len(h)):
            acc.add(_input_of(original, name, src[j:j + 1], kw), _input_of(layer, name, hp[j:j + 1], kw))
        lin = module(layer, name)
        lin.weight.data = refit(module(original, name).weight.data, acc, cols, damp)
    for j in range(len(h)):
        h[j:j + 1] = _output(original(h[j:j + 1], **kw))
        hp[j:j + 1] = _output(layer(hp[j:j + 1], **kw))


def apply_sequential(model: torch.nn.Module, arch: Arch, geo: Geometry, widths: Widths, keeps: list[slicing.Keep],
                     windows: torch.Tensor, target: str = "original", damp: float = slicing.RECONSTRUCT_DAMP) -> None:
    """Slice every layer to `widths` in place, refitting o/down layer by layer on the pruned model's own
    inputs over the calibration `windows`; rewrite the config (what `slicing.apply` does one-shot)."""
    layers = decoder_layers(model)
    with torch.inference_mode():
        h, kwargs = capture_inputs(model, windows, model_device(model))
        hp = h.clone()
    for i, (layer, keep) in enumerate(zip(layers, keeps)):
        original = copy.deepcopy(layer)
        slicing._slice_layer(layer, arch, geo, widths, keep)
        with torch.inference_mode():
            _refit_layer(original, layer, arch, geo, keep, h, hp, kwargs[i], target, damp)
        for name in (arch.o, arch.mlp_out):   # out of inference mode, so the model can be trained later
            lin = module(layer, name)
            lin.weight = torch.nn.Parameter(lin.weight.data.clone(), requires_grad=lin.weight.requires_grad)
        del original
    slicing.rewrite_config(model.config, geo, widths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--widths", default="6/3/1144", help="heads/kv_heads/intermediate to keep")
    ap.add_argument("--importance", default=PruneOptions.importance)
    ap.add_argument("--nsamples", type=int, default=PruneOptions.nsamples)
    ap.add_argument("--seq-len", type=int, default=PruneOptions.seq_len)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--targets", default="original", help="sequential variants: original and/or pruned, comma-separated")
    ap.add_argument("--damps", default=str(slicing.RECONSTRUCT_DAMP), help="ridge fractions, comma-separated")
    ap.add_argument("--oneshot-damps", default=str(slicing.RECONSTRUCT_DAMP),
                    help="ridge fractions of the one-shot refit (prune's is the default), comma-separated")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; python {' '.join(sys.argv)}", flush=True)
    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    arch = arch_for(text_config(model.config))
    geo = geometry(model.config, arch)
    opts = PruneOptions(args.model, "unused", axes="heads,mlp", importance=args.importance, calib="wikitext2",
                        nsamples=args.nsamples, seq_len=args.seq_len, device="cpu")
    calib, _ = text_windows(tok, "wikitext2", "calib", args.seq_len, nsamples=args.nsamples, seed=opts.seed)
    held, _ = text_windows(tok, "wikitext2", "calib", args.seq_len, nsamples=min(SELECTION_WINDOWS, args.nsamples),
                           seed=opts.seed + 7919)
    evals = load_windows(tok, "wikitext2", "eval", 2048, max_windows=args.eval_windows)
    print(f"# {model.dtype}; calibration {len(calib)} x {args.seq_len}; eval {len(evals)} x 2048 of "
          f"{evals.description}", flush=True)

    def report(name: str, m: torch.nn.Module, took: float) -> None:
        t = time.time()
        loss = slicing.calibration_loss(m, held)
        ppl = math.exp(window_nll(m, evals).mean().item())
        print(f"{name}: held-out loss {loss:.4f}, wiki.test ppl {ppl:.3f} [refit {took:.0f}s, eval "
              f"{time.time() - t:.0f}s]", flush=True)

    report("original", model, 0.0)
    t = time.time()
    measured = measure(model, arch, geo, opts, ("heads", "mlp"), calib)
    print(f"# scored with {args.importance} in {time.time() - t:.0f}s", flush=True)
    h, kv, inter = (int(x) for x in args.widths.split("/"))
    widths = Widths(h, kv, inter)

    plain = slicing.reconstruct
    for damp in (float(d) for d in args.oneshot_damps.split(",") if d):
        one = copy.deepcopy(model)
        t = time.time()
        slicing.reconstruct = functools.partial(plain, damp=damp)   # what slicing.apply calls
        try:
            build(one, arch, geo, Shape(geo.hidden, geo.layers, widths), measured)
        finally:
            slicing.reconstruct = plain
        report(f"one-shot refit (damp {damp}), {args.widths}", one, time.time() - t)
        del one

    keeps = slicing.choose(measured.width, geo, widths)
    for target in (t for t in args.targets.split(",") if t):
        for damp in (float(d) for d in args.damps.split(",")):
            seq = copy.deepcopy(model)
            t = time.time()
            apply_sequential(seq, arch, geo, widths, keeps, calib, target, damp)
            report(f"sequential refit (target {target}, damp {damp}), {args.widths}", seq, time.time() - t)
            del seq


if __name__ == "__main__":
    main()
