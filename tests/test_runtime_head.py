"""`--head`: llmopt's runtime serving a GPTQ checkpoint's full-precision output head as 8-bit, 4-bit or
mixed codes.

The checkpoint is not changed (transformers must still read it); what changes is what bench and
generate run, so the logits must be those of the int8-rounded head, the tied embeddings must come
from the same codes, and the choice must be visible and refusable.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize
from llmopt.quantize.qlinear import QuantLinear
from llmopt.quantize.head import (HEAD_INT8_MASS, HEAD_SAMPLE_TOKENS, MixedHead, QuantEmbedding, round_head,
                                  runtime_head, token_mass)


def _gptq(src, out, **kw):
    opts = dict(calib="builtin", nsamples=4, seq_len=32, device="cpu", group_size=32)
    opts.update(kw)
    quantize(QuantizeOptions(model=str(src), output=str(out), **opts))
    return out


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    """The head as the runtime should hold it: symmetric 8-bit per row, scale rounded to bfloat16."""
    exact = (w.abs().amax(dim=1) / 127).clamp(min=1e-30)      # an all-zero row (padding) stays zero
    scale = exact.to(torch.bfloat16).float()
    return torch.round(w / exact[:, None]).clamp(-127, 127) * scale[:, None]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])   # tied, tied + scaled embeddings, untied
def test_int8_head_logits_are_the_int8_rounded_heads(arch, tiny_model_dir, tmp_path):
    out = _gptq(tiny_model_dir(arch), tmp_path / "q")
    full = load_model(str(out), device="cpu", head="full").model
    int8 = load_model(str(out), device="cpu", head="int8").model
    assert isinstance(full.lm_head, torch.nn.Linear)
    assert isinstance(int8.lm_head, QuantLinear) and int8.lm_head.mode == "int8"
    assert int8.runtime_head == "int8" and not hasattr(full, "runtime_head")
    tied = full.config.tie_word_embeddings
    assert isinstance(int8.get_input_embeddings(), QuantEmbedding) == tied
    reference = _int8_rows(full.lm_head.weight.detach().float())
    assert torch.allclose(int8.lm_head.dequantized_weight(torch.float32), reference, rtol=0, atol=1e-6)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    int8.lm_head.register_forward_hook(lambda m, args, y: seen.update(x=args[0], y=y))
    with torch.no_grad():
        got = int8(ids).logits
        base = full(ids).logits
    expected = seen["x"] @ reference.t()
    assert torch.linalg.norm(seen["y"] - expected) / torch.linalg.norm(expected) < 1e-2   # bf16 activations
    assert not torch.equal(got, base)                       # the head really is another one
    if tied:     # embeddings read from the same codes: the first layer sees the int8-rounded rows
        emb = int8.get_input_embeddings()(ids[0])
        scale = getattr(full.get_input_embeddings(), "embed_scale", None)
        rows = reference[ids[0]] * (1.0 if scale is None else scale.float())
        assert torch.allclose(emb.float(), rows, rtol=1e-2, atol=1e-3)


def test_auto_is_mixed_on_cpu_and_transforms_load_the_head_as_stored(tiny_model_dir, tmp_path):
    out = _gptq(tiny_model_dir("llama"), tmp_path / "q")
    auto = load_model(str(out), device="cpu", head="auto").model
    mixed = load_model(str(out), device="cpu", head="mixed").model
    assert runtime_head("auto", torch.device("cpu")) == "mixed" and runtime_head("auto", torch.device("cuda")) == "full"
    assert auto.runtime_head == mixed.runtime_head == "int8"      # a random model finds every row likely
    assert torch.equal(auto.lm_head.dequantized_weight(), mixed.lm_head.dequantized_weight())
    # load_model's default is what transforms (quantize, prune, distill) need: the stored head
    assert isinstance(load_model(str(out), device="cpu").model.lm_head, torch.nn.Linear)


def test_a_quantized_head_is_left_as_the_checkpoint_has_it(tiny_model_dir, tmp_path):
    out = _gptq(tiny_model_dir("llama"), tmp_path / "q", lm_head=True)
    model = load_model(str(out), device="cpu", head="int8").model
    assert model.lm_head.group_size == -1 and model.lm_head.bits == 8
    assert not hasattr(model, "runtime_head")            # nothing was rounded at load
    assert round_head(model, "int8") is None


def test_bench_says_which_model_had_its_head_rounded(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    out = _gptq(src, tmp_path / "q")
    code, stdout, err = cli("bench", str(out), "--baseline", str(src), "--skip-speed", "--ppl-data", "builtin",
                            "--seq-len", "32", "--ppl-windows", "2", "--json")
    assert code == 0, err
    rows = {r["role"]: r for r in json.loads(stdout)["models"]}
    assert rows["model"]["runtime_head"] == "int8" and rows["baseline"]["runtime_head"] is None   # auto
    code, stdout, err = cli("bench", str(out), "--baseline", str(src), "--skip-speed", "--ppl-data", "builtin",
                            "--seq-len", "32", "--ppl-windows", "2", "--head", "full", "--json")
    assert code == 0, err
    assert all(r["runtime_head"] is None for r in json.loads(stdout)["models"])


@pytest.mark.parametrize("command", [["generate", "{m}", "hi"], ["bench", "{m}", "--skip-speed"]])
def test_bad_head_exits_2_before_loading(command, tiny_model_dir, tmp_path, cli):
    model = tiny_model_dir("llama")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli(*[c.format(m=model) for c in command], "--head", "int2")
    assert code == 2 and "--head 'int2'" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _int4_groups(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """The head as `--head int4` should hold it: per group of 32 columns, min..max (0 included) over 15
    steps, round to nearest; scale and float zero point as the int4 kernel keeps them (bfloat16)."""
    g = w.view(w.shape[0], -1, group)
    lo, hi = g.amin(2).clamp(max=0), g.amax(2).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-30)
    zero = (-lo / scale).round()
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15)
    s = scale.to(torch.bfloat16).float()
    zf = ((8 - zero) * scale).to(torch.bfloat16).float()
    return ((q - 8) * s[..., None] + zf[..., None]).view_as(w)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])     # tied; tied + scaled embeddings
def test_int4_head_holds_round_to_nearest_4bit_groups_and_feeds_the_embeddings(arch, tiny_model_dir, tmp_path):
    out = _gptq(tiny_model_dir(arch), tmp_path / "q")
    full = load_model(str(out), device="cpu", head="full").model
    int4 = load_model(str(out), device="cpu", head="int4").model
    assert int4.runtime_head == "int4" and int4.lm_head.mode == "int4" and int4.lm_head.group_size == 32
    reference = _int4_groups(full.lm_head.weight.detach().float())
    w = int4.lm_head.dequantized_weight(torch.float32)
    step = (reference.abs().amax() / 7).item()
    assert (w - reference).abs().max().item() < step / 64     # bf16 rounding of scale and zero only
    emb = int4.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding)
    ids = torch.tensor([3, 17, 200])
    scale = getattr(full.get_input_embeddings(), "embed_scale", None)
    rows = w[ids] * (1.0 if scale is None else scale.float())
    assert torch.allclose(emb(ids).float(), rows, rtol=1e-2, atol=1e-3)
    assert int4.lm_head.kernel_bytes * 2 == w.numel()          # half a byte per weight


def test_bench_json_names_the_int4_head(tiny_model_dir, tmp_path, cli):
    out = _gptq(tiny_model_dir("llama"), tmp_path / "q")
    code, stdout, err = cli("bench", str(out), "--skip-speed", "--ppl-data", "builtin", "--seq-len", "32",
                            "--ppl-windows", "2", "--head", "int4", "--json")
    assert code == 0, err
    assert json.loads(stdout)["models"][0]["runtime_head"] == "int4"


def _sharpened(model):
    """The model with its final norm's gain x30: peaked next-token distributions, as a trained model has
    (a tiny random one spreads its probability over the whole vocabulary)."""
    norm = model.model.norm
    offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0      # Gemma's norm scales by (1 + w)
    norm.weight.data = (norm.weight.data + offset) * 30 - offset
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])   # tied, tied + scaled embeddings, untied
def test_mixed_head_serves_the_likeliest_rows_in_int8_and_the_rest_in_int4(arch, tiny_model_dir, tmp_path):
    out = _gptq(tiny_model_dir(arch), tmp_path / "q")
    full = _sharpened(load_model(str(out), device="cpu", head="full").model)
    mixed = _sharpened(load_model(str(out), device="cpu", head="full").model)
    assert round_head(mixed, "mixed") == "mixed"
    head = mixed.lm_head
    assert isinstance(head, MixedHead)
    assert head.wide.mode == "int8" and head.narrow.mode == "int4" and head.narrow.group_size == 32
    vocab = full.lm_head.out_features
    assert head.out_features == vocab and 0 < head.wide.out_features < vocab
    # the int8 rows: the fewest that hold HEAD_INT8_MASS of the probability over the tokens the stored model
    # samples (any row with more mass than one of them is among them)
    mass = token_mass(full, HEAD_SAMPLE_TOKENS)
    wide = torch.zeros(vocab, dtype=torch.bool)
    wide[head.wide_ids] = True
    assert mass[wide].sum() >= HEAD_INT8_MASS * mass.sum() > mass[wide].sum() - mass[wide].min()
    assert mass[~wide].max() <= mass[wide].min()
    w = full.lm_head.weight.detach().float()
    reference = _int4_groups(w)
    reference[head.wide_ids] = _int8_rows(w[head.wide_ids])
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = head(x)
    expected = x @ reference.t()
    assert torch.linalg.norm(y - expected) / torch.linalg.norm(expected) < 1e-2     # bf16 activations
    assert torch.linalg.norm(y - x @ w.t()) / torch.linalg.norm(expected) > 1e-3     # really rounded
    emb = mixed.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) == full.config.tie_word_embeddings
    if isinstance(emb, QuantEmbedding):      # rows from both parts, in the vocabulary's order
        ids = torch.cat([head.wide_ids[:2], head.narrow_ids[:2]])
        scale = getattr(full.get_input_embeddings(), "embed_scale", None)
        rows = reference[ids] * (1.0 if scale is None else scale.float())
        assert torch.allclose(emb(ids).float(), rows, rtol=1e-2, atol=1e-3)


def test_mixed_head_is_int8_when_every_row_is_likely(tiny_model_dir, tmp_path):
    out = _gptq(tiny_model_dir("llama"), tmp_path / "q")      # random weights: probability spread over all rows
    model = load_model(str(out), device="cpu", head="mixed").model
    assert model.runtime_head == "int8" and model.lm_head.mode == "int8"
