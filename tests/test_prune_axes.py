"""`llmopt prune` along hidden size and depth: shapes, ties, config lists, exactness, counts, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import prune_refused
from transformers import AutoModelForCausalLM

from conftest import build_tiny
from llmopt.info import count_parameters
from llmopt.prune import Measured, PruneOptions, build, measure, plan, prune, rank_channels
from llmopt.prune import depth as dep
from llmopt.prune import hidden as hid
from llmopt.prune import slicing
from llmopt.prune.slicing import calibration_loss
from llmopt.prune.plan import Shape, full_shape, parse_axes, parse_count
from llmopt.prune.structure import Widths, arch_for, decoder_layers, geometry
from llmopt.recipes import build_options

FAST = dict(nsamples=2, seq_len=32, calib="builtin", device="cpu")
GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
ARCHS = [("llama", {}), ("qwen2", {}), ("gemma3", {"layer_types": GEMMA_TYPES})]
IDS = ["llama-tied", "qwen2-bias-untied", "gemma3-tied-scaled"]


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _saved(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _measured(model, axes=("hidden", "depth", "heads", "mlp")) -> Measured:
    arch = arch_for(model.config)
    geo = geometry(model.config, arch)
    windows = torch.cat([_ids(32, seed=k) for k in range(3)])
    return measure(model, arch, geo, PruneOptions("m", "o", **FAST), axes, windows)


# ----------------------------------------------------------------------------- end to end, plain reload

@pytest.mark.parametrize("arch,overrides", ARCHS, ids=IDS)
def test_hidden_pruning_writes_a_standard_checkpoint(arch, overrides, tmp_path, tiny_tokenizer):
    model = build_tiny(arch, tiny_tokenizer, **overrides)
    src = _saved(model, tiny_tokenizer, tmp_path / "src")
    summary = prune(PruneOptions(str(src), str(tmp_path / "out"), ratio=0.25, axes="hidden", **FAST))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()     # plain transformers
    h = summary["hidden_after"]
    assert h < 64 and h % 8 == 0 and pruned.config.hidden_size == h
    assert [r["hidden"] for r in summary["channel_scores"]] == [h]       # both channel scores were measured
    assert set(summary["channel_scores"][0]["calibration_loss"]) == {"activation", "taylor"}
    assert summary["layers_after"] == 3 and summary["widths_after"] == summary["widths_before"]
    assert pruned.model.embed_tokens.weight.shape == (len(tiny_tokenizer), h)
    assert pruned.lm_head.weight.shape == (len(tiny_tokenizer), h)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == model.config.tie_word_embeddings
    assert pruned.model.norm.weight.shape == (h,)
    for layer in decoder_layers(pruned):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.in_features == attn.k_proj.in_features == attn.v_proj.in_features == h
        assert attn.o_proj.out_features == mlp.down_proj.out_features == h
        assert mlp.gate_proj.in_features == mlp.up_proj.in_features == h
        assert attn.q_proj.out_features == 4 * 16                   # heads keep head_dim
        for name, norm in layer.named_children():
            if "norm" in name:
                assert norm.weight.shape == (h,)
        if arch == "qwen2":
            assert attn.q_proj.bias.shape == (64,) and attn.k_proj.bias.shape == (32,)
    assert sum(p.numel() for p in pruned.parameters()) == summary["parameters_after"]
    assert summary["ratio_achieved"] >= 0.25
    assert torch.isfinite(_logits(pruned, _ids())).all()


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=IDS)
def test_depth_pruning_writes_a_standard_checkpoint(arch, overrides, tmp_path, tiny_tokenizer):
    model = build_tiny(arch, tiny_tokenizer, **overrides)
    src = _saved(model, tiny_tokenizer, tmp_path / "src")
    summary = prune(PruneOptions(str(src), str(tmp_path / "out"), ratio=0.15, axes="depth", **FAST))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    kept = [i for i in range(3) if i not in summary["layers_removed"]]
    assert len(summary["layers_removed"]) == 1 and summary["layers_after"] == 2
    assert pruned.config.num_hidden_layers == len(decoder_layers(pruned)) == 2
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    if arch != "llama":                        # Qwen2 and Gemma3 configs list a type per layer
        assert pruned.config.layer_types == [model.config.layer_types[i] for i in kept]
        assert len(cfg["layer_types"]) == 2
    assert sum(p.numel() for p in pruned.parameters()) == summary["parameters_after"]
    assert torch.isfinite(_logits(pruned, _ids())).all()


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=IDS)
def test_every_axis_together_reloads_to_the_same_logits(arch, overrides, tmp_path, tiny_tokenizer):
    """The model cut in memory and its saved checkpoint loaded by plain transformers compute the same:
    hidden_size, the embedding scale Gemma derives from it, layer numbering and config lists all agree."""
    model = build_tiny(arch, tiny_tokenizer, **overrides)
    m = _measured(model)
    arch_ = arch_for(model.config)
    geo = geometry(model.config, arch_)
    shape = Shape(48, 2, Widths(2, geo.kv_heads, 96))
    dropped = build(model, arch_, geo, shape, m)
    assert len(dropped) == 1
    ids = _ids()
    in_memory = _logits(model, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(_saved(model, tiny_tokenizer, tmp_path / "m")).eval()
    assert (reloaded.config.hidden_size, reloaded.config.num_hidden_layers) == (48, 2)
    torch.testing.assert_close(_logits(reloaded, ids), in_memory, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("arch,overrides", ARCHS, ids=IDS)
def test_pruning_by_zero_on_every_axis_keeps_the_logits(arch, overrides, tiny_tokenizer):
    model = build_tiny(arch, tiny_tokenizer, **overrides)
    ids = _ids()
    before = _logits(model, ids)
    m = _measured(model)
    arch_ = arch_for(model.config)
    geo = geometry(model.config, arch_)
    assert build(model, arch_, geo, full_shape(geo), m) == []
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 3)


def _kill_channels(model, arch, dead: list[int]) -> None:
    """Make residual channels `dead` exactly zero everywhere: no embedding column, no write by any layer."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, dead] = 0
        for layer in decoder_layers(model):
            layer.get_submodule(arch.o).weight[dead] = 0
            layer.get_submodule(arch.mlp_out).weight[dead] = 0


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=IDS)
def test_removing_dead_hidden_channels_keeps_the_logits(arch, overrides, tmp_path, tiny_tokenizer):
    """Channels that are zero everywhere carry nothing: the importance ranks them last, and removing them
    changes the logits only as far as the norms' epsilon does, because every RMSNorm is compensated for
    averaging over fewer channels and Gemma's sqrt(hidden_size) embedding scale for the new size
    (both recomputed by plain transformers on reload)."""
    # a tiny eps: in a random model the post-attention norms (Gemma) see inputs near 1e-8 in square,
    # where the default eps, not the channels, would set the scale
    model = build_tiny(arch, tiny_tokenizer, rms_norm_eps=1e-12, **overrides)
    a = arch_for(model.config)
    dead = [1, 9, 17, 30, 42, 50, 58, 63]
    _kill_channels(model, a, dead)
    ids = _ids()
    before = _logits(model, ids)
    m = _measured(model, axes=("hidden",))
    assert set(m.channels) == {"activation", "taylor"}
    for score in m.channels.values():
        assert set(range(64)) - set(hid.keep_channels(score, 64 - len(dead)).tolist()) == set(dead)
    geo = geometry(model.config, a)
    build(model, a, geo, Shape(64 - len(dead), 3, full_shape(geo).widths), m)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(_saved(model, tiny_tokenizer, tmp_path / "m")).eval()
    torch.testing.assert_close(_logits(reloaded, ids), before, rtol=1e-4, atol=1e-4)


def test_channels_nothing_reads_rank_last_by_taylor_and_first_by_activation(tiny_tokenizer):
    """With a gradient pass (taylor-obs, the default) residual channels are ranked by Taylor over the
    projections that read and write them: a channel no layer reads or writes scores zero however large
    the embedding makes it. The activation score (without gradients) ranks the same channels first."""
    model = build_tiny("llama", tiny_tokenizer)
    a = arch_for(model.config)
    loud = [3, 20, 41]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, loud] *= 50
        for layer in decoder_layers(model):
            for name in (a.q, a.k, a.v, *a.mlp_in):
                layer.get_submodule(name).weight[:, loud] = 0
            for name in (a.o, a.mlp_out):
                layer.get_submodule(name).weight[loud] = 0
    geo = geometry(model.config, a)
    windows = torch.cat([_ids(32, seed=k) for k in range(3)])
    scores = measure(model, a, geo, PruneOptions("m", "o", **FAST), ("hidden",), windows).channels
    assert set(torch.argsort(scores["taylor"])[:3].tolist()) == set(loud)
    assert set(torch.argsort(scores["activation"], descending=True)[:3].tolist()) == set(loud)
    without_gradients = measure(model, a, geo, PruneOptions("m", "o", importance="l2", **FAST), ("hidden",), windows)
    assert list(without_gradients.channels) == ["activation"]


def test_each_hidden_size_uses_the_channel_score_that_lost_least_there(tiny_tokenizer):
    model = build_tiny("llama", tiny_tokenizer)
    a = arch_for(model.config)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :8] *= 20     # channels whose removal the model notices
    m = _measured(model, axes=("hidden",))
    m.channels = {"loud first": m.channels["activation"], "loud last": -m.channels["activation"]}
    selection = _ids(32, seed=9)
    rows = rank_channels(model, a, m, [56, 40], selection)
    for size, row in zip((56, 40), rows):
        losses = {}
        for name, score in m.channels.items():
            trial = copy.deepcopy(model)
            hid.apply(trial, a, hid.keep_channels(score, size), m.hidden)
            losses[name] = round(calibration_loss(trial, selection), 4)
        assert row["calibration_loss"] == losses and losses["loud first"] != losses["loud last"]
        assert m.ranking[size] == row["chosen"] == min(losses, key=losses.get)
        assert m.channel_scores(size) is m.channels[row["chosen"]]


def test_without_norm_compensation_dead_channels_change_the_logits(tiny_tokenizer):
    """The compensation is what keeps the logits above: a plain slice (no statistics) does not."""
    model = build_tiny("llama", tiny_tokenizer)
    a = arch_for(model.config)
    dead = list(range(0, 64, 4))
    _kill_channels(model, a, dead)
    ids = _ids()
    before = _logits(model, ids)
    keep = torch.tensor([i for i in range(64) if i not in dead])
    hid.apply(model, a, keep, None)
    assert (_logits(model, ids) - before).abs().max() > 1e-2


def _q0(model, ids) -> torch.Tensor:
    """Layer 0's q_proj output: what the refit of the stream-reading projections aims to keep."""
    seen = []
    hook = decoder_layers(model)[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(o))
    _logits(model, ids)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=IDS)
def test_hidden_refit_rebuilds_what_removed_channels_fed_the_projections(arch, overrides, tiny_tokenizer):
    """When the stream's channels are correlated (here: a rank-8 embedding), the channels removed are
    linear in the kept ones, and the least-squares refit of q/k/v/gate/up keeps layer 0's queries far
    closer to the original than slicing the same columns without it."""
    model = build_tiny(arch, tiny_tokenizer, **overrides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape[0], 8, generator=g) @ torch.randn(8, emb.shape[1], generator=g) / 8)
    a = arch_for(model.config)
    ids = _ids()
    before = _q0(model, ids)
    m = _measured(model, axes=("hidden",))
    assert m.hidden.grams, "--reconstruct (the default) measures the norm-output Grams"
    keep = hid.keep_channels(m.channel_scores(40), 40)
    plain = copy.copy(m.hidden)
    plain.grams = None
    errors = []
    for stats in (m.hidden, plain):
        trial = copy.deepcopy(model)
        hid.apply(trial, a, keep, stats)
        errors.append((_q0(trial, ids) - before).norm().item() / before.norm().item())
    refit, sliced = errors
    assert refit < 0.25 * sliced, errors


def test_a_layer_that_adds_nothing_costs_nothing_to_skip_and_to_remove(tiny_tokenizer):
    model = build_tiny("gemma3", tiny_tokenizer, layer_types=GEMMA_TYPES)
    with torch.no_grad():
        layer = decoder_layers(model)[1]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    ids = _ids()
    before = _logits(model, ids)
    m = _measured(model, axes=("depth",))
    windows = torch.cat([_ids(32, seed=k) for k in range(3)])
    assert m.skip[1] == pytest.approx(slicing.calibration_loss(model, windows), abs=1e-6)
    assert all(abs(m.skip[i] - m.skip[1]) > 1e-4 for i in (0, 2))   # the others do something
    assert dep.drop_order([3.0, 1.0, 2.0]) == [1, 2, 0]
    dep.remove_layers(model, [1])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- counting and planning

@pytest.mark.parametrize("arch,overrides", ARCHS + [("llama", {"tie_word_embeddings": False,
                                                               "attention_bias": True, "mlp_bias": True})],
                         ids=IDS + ["llama-untied-biases"])
def test_counter_matches_models_built_at_each_shape(arch, overrides, tiny_tokenizer):
    model = build_tiny(arch, tiny_tokenizer, **overrides)
    p = plan(model.config, PruneOptions("m", "o", ratio=0.3))
    for shape in [Shape(64, 3, Widths(4, 2 if arch != "gemma3" else 1, 128)), Shape(40, 2, Widths(2, 1, 24)),
                  Shape(8, 1, Widths(1, 1, 8))]:
        cfg = copy.deepcopy(model.config)
        cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = shape.hidden, shape.layers, \
            shape.widths.intermediate
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = shape.widths.heads, \
            shape.widths.kv_heads, 16
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:shape.layers]
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(cfg)
        assert p.counter.count(shape) == count_parameters(built), shape


def test_the_plan_is_chosen_by_measured_loss_and_recorded(tmp_path, tiny_tokenizer):
    src = _saved(build_tiny("llama", tiny_tokenizer), tiny_tokenizer, tmp_path / "src")
    summary = prune(PruneOptions(str(src), str(tmp_path / "out"), ratio=0.3, **FAST))
    tried = summary["plans_tried"]
    stages = {t["stage"] for t in tried}
    assert {"width", "axes"} <= stages
    assert any(t["hidden"] < 64 for t in tried) and any(t["layers"] < 3 for t in tried)
    best = min(tried, key=lambda t: t["calibration_loss"])
    wa = summary["widths_after"]
    assert (best["hidden"], best["layers"], best["heads"], best["kv_heads"], best["intermediate"]) == \
        (summary["hidden_after"], summary["layers_after"], wa["heads"], wa["kv_heads"], wa["intermediate"])
    assert best["parameters"] == summary["parameters_after"]
    assert all(summary["parameters_before"] - t["parameters"] >= 0.3 * summary["parameters_before"] for t in tried)
    record = json.loads((tmp_path / "out" / "llmopt.json").read_text())
    assert record["metrics"]["plans_tried"] == tried and record["parameters"]["axes"] == "auto"


def test_target_params_is_met(tmp_path, tiny_tokenizer):
    src = _saved(build_tiny("llama", tiny_tokenizer), tiny_tokenizer, tmp_path / "src")
    summary = prune(PruneOptions(str(src), str(tmp_path / "out"), target_params="100K", **FAST))
    assert summary["target_params"] == 100_000
    assert 90_000 < summary["parameters_after"] <= 100_000
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in reloaded.parameters()) == summary["parameters_after"]


def test_axes_and_counts_parse():
    assert parse_axes("auto") == ("hidden", "depth", "heads", "mlp")
    assert parse_axes("mlp, hidden") == ("hidden", "mlp")
    assert parse_count("100M") == 100_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count("250k") == 250_000 and parse_count(123) == 123
    assert PruneOptions("m", "o", axes="heads,mlp", split="mlp").axis_list() == ("mlp",)


def test_recipes_take_the_new_options():
    opts = build_options(PruneOptions, {"model": "m", "output": "o", "axes": "hidden,depth",
                                        "target_params": 100000000}, "step 1 (prune)")
    assert opts.axes == "hidden,depth" and parse_count(opts.target_params) == 100_000_000


# ----------------------------------------------------------------------------- bad input (exit 2, nothing written)

_bad = prune_refused


def test_target_params_below_reach(cli, tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    _bad(cli, tmp_path / "out", path, "--target-params", "1000", match="--target-params 1000 is too low")
    _bad(cli, tmp_path / "out", path, "--target-params", "40K", "--axes", "heads,mlp",
         match="one query head per KV group")
    _bad(cli, tmp_path / "out", path, "--target-params", "10M", match="is not below the model's")
    _bad(cli, tmp_path / "out", path, "--target-params", "lots", match="invalid --target-params")


def test_unknown_axes(cli, tiny_model_dir, tmp_path):
    _bad(cli, tmp_path / "out", tiny_model_dir("llama"), "--axes", "hidden,width", match="unknown --axes 'width'")
    _bad(cli, tmp_path / "out", tiny_model_dir("llama"), "--axes", ",", match="unknown --axes")


def test_cli_prints_the_plans_measured(cli, tiny_model_dir, tmp_path):
    code, _, err = cli("prune", tiny_model_dir("gemma3"), "-o", tmp_path / "p", "--ratio", "0.3",
                       "--calib", "builtin", "--nsamples", "2", "--seq-len", "32")
    assert code == 0, err
    assert "plans measured" in err and "chosen" in err and "hidden size" in err and "layers" in err
    assert "channel scores" in err and "activation" in err and "taylor" in err
    code, out, _ = cli("prune", "--help")
    assert code == 0 and "--axes" in out and "--target-params" in out
