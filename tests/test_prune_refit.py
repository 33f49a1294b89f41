"""The sequential least-squares refit measured in benchmarks/prune_refit.py (not part of prune: it measured
worse than the one-shot refit, docs/prune.md): it must be correct for that comparison to mean anything."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import build_tiny
from conftest import ROOT
from llmopt.prune import importance as imp
from llmopt.prune import slicing
from llmopt.prune.structure import Widths, arch_for, decoder_layers, geometry, module

_spec = importlib.util.spec_from_file_location("prune_refit", ROOT / "benchmarks" / "prune_refit.py")
refit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refit)


def _windows(n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _setup(arch: str, tokenizer, widths: Widths | None):
    model = build_tiny(arch, tokenizer)
    a = arch_for(model.config)
    geo = geometry(model.config, a)
    widths = widths or Widths(geo.heads, geo.kv_heads, geo.intermediate)
    keeps = slicing.choose(imp.random_scores(geo, 1), geo, widths)
    return model, a, geo, widths, keeps


def _one_shot(model, a, geo, widths, keeps, windows):
    grams = slicing.Grams()
    with grams.capture(model, a):
        slicing.forward_all(model, windows)
    slicing.apply(model, a, geo, widths, keeps, grams)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_uncut_model_is_unchanged(arch, tiny_tokenizer):
    """Keeping every structure, the sequential refit leaves the weights and logits exactly as they were."""
    model, a, geo, widths, keeps = _setup(arch, tiny_tokenizer, None)
    ids = _windows(1, 24, seed=5)
    before = _logits(model, ids)
    refit.apply_sequential(model, a, geo, widths, keeps, _windows())
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_first_layer_equals_the_one_shot_refit(arch, tiny_tokenizer):
    """Layer 0's o_proj sees the original inputs, so its sequential refit is the one-shot refit; its down_proj
    already sees the pruned attention, and so do all later layers: those differ."""
    model, a, geo, widths, keeps = _setup(arch, tiny_tokenizer, Widths(2, 1, 64))
    seq = copy.deepcopy(model)
    windows = _windows()
    _one_shot(model, a, geo, widths, keeps, windows)
    refit.apply_sequential(seq, a, geo, widths, keeps, windows)
    first = lambda m, name: module(decoder_layers(m)[0], name).weight   # noqa: E731
    torch.testing.assert_close(first(seq, a.o), first(model, a.o), rtol=1e-3, atol=1e-4)
    assert (first(seq, a.mlp_out) - first(model, a.mlp_out)).abs().max() > 1e-3
    last = module(decoder_layers(model)[-1], a.o).weight
    assert (module(decoder_layers(seq)[-1], a.o).weight - last).abs().max() > 1e-3
    assert seq.config.num_attention_heads == 2 and seq.config.intermediate_size == 64


def test_refit_beats_the_one_shot_weights_on_shifted_inputs():
    """On inputs shifted from the original ones (what earlier pruned layers cause), the sequential solve
    matches the original output better than the one-shot weights fitted on the original inputs (it is the
    least-squares optimum on the inputs it sees, so it can only tie)."""
    torch.manual_seed(0)
    x = torch.randn(4096, 32) @ torch.randn(32, 32)
    xp = x + 0.3 * torch.randn(4096, 32) @ torch.randn(32, 32)
    w = torch.randn(16, 32)
    keep = torch.arange(0, 32, 2)
    one_shot = slicing.reconstruct(w, x.T @ x, keep, damp=1e-6)
    acc = refit.CrossGram()
    acc.add(x, xp[:, keep])
    seq = refit.refit(w, acc, keep, damp=1e-6)
    err = lambda wk: ((x @ w.T - xp[:, keep] @ wk.T) ** 2).mean()   # noqa: E731
    assert err(seq) < 0.95 * err(one_shot)   # the least-squares minimum on these inputs: never above
