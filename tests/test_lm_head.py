"""The output head in the GPTQ layout (--lm-head): the quantized head, a tied model's embeddings served
from it, the checkpoint other loaders read, and --no-lm-head leaving the layout as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_close_to_original
from safetensors.torch import load_file

from llmopt.errors import UserError
from llmopt.info import weight_bytes
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, packing, quantize, runtime
from llmopt.quantize.qlinear import QuantLinear
from llmopt.quantize.head import QuantEmbedding
from llmopt.quantize.runtime import module_grid

_HEAD_KEYS = {f"lm_head.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")}


def _opts(model, out, **kw) -> QuantizeOptions:
    base = dict(calib="builtin", nsamples=8, seq_len=32, device="cpu")
    base.update(kw)
    return QuantizeOptions(model=str(model), output=str(out), **base)


def _head_reference(out, head: QuantLinear) -> torch.Tensor:
    """W [N, K] of the head as the checkpoint stores it, dequantized in float32."""
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = load_file(out / "model.safetensors")
    parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k in _HEAD_KEYS}
    bits, group = module_grid(cfg, "lm_head", cfg["bits"], cfg["group_size"])
    q, zeros, scales, g_idx = packing.unpack_layer(parts, bits, cfg["checkpoint_format"], head.in_features,
                                                   head.out_features, group)
    return packing.dequantize(q, zeros, scales, g_idx)


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(method="gptq", group_size=32)),                     # tied
    ("qwen2", dict(method="rtn", group_size=32, sym=False)),           # untied, asymmetric
    ("gemma3", dict(method="int8")),                                   # tied, scaled embeddings
    ("llama", dict(method="gptq", bits=8, group_size=32)),             # 8-bit: the head on the decoder's grid
])
def test_quantized_head_logits_match_the_dequantized_reference(arch, kw, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    summary = quantize(_opts(tiny_model_dir(arch), out, lm_head=True, **kw))
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    if qconfig["bits"] < 8:     # below 8 bits the head is 8-bit per channel, said by a dynamic override
        assert qconfig["dynamic"] == {"+:^lm_head$": {"bits": 8, "group_size": -1, "sym": True, "desc_act": False}}
    else:
        assert "dynamic" not in qconfig
    assert summary["layers"][-1]["module"] == "lm_head" and summary["layers"][-1]["layer"] is None
    assert _HEAD_KEYS <= set(load_file(out / "model.safetensors")) - {"lm_head.weight"}
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = load_model(str(out), device="cpu").model
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    assert model.lm_head.group_size == (32 if kw.get("bits") == 8 else -1)
    seen = {}
    model.lm_head.register_forward_hook(lambda m, args, y: seen.update(x=args[0], y=y))
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    reference = seen["x"] @ _head_reference(out, model.lm_head).t()
    # the int4 / int8 kernels take bfloat16 activations
    assert torch.linalg.norm(seen["y"] - reference) / torch.linalg.norm(reference) < 1e-2


def test_by_default_the_head_stays_full_precision_and_tied_for_transformers(tiny_model_dir, tmp_path):
    """transformers' own GPTQ loading cannot read a quantized head, so the default must not write one."""
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    quantize(_opts(src, out, group_size=32))                   # no lm_head option: the default
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["quantization_config"]["lm_head"] is False
    assert not [k for k in load_file(out / "model.safetensors") if k.startswith("lm_head.")]


def test_lm_head_quantizes_a_tied_head_untied_in_config_with_the_source_embeddings_written(
        tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    quantize(_opts(src, out, group_size=32, lm_head=True))
    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert config["tie_word_embeddings"] is False
    assert qconfig["lm_head"] is True and qconfig["meta"]["tied_embeddings"] is True
    assert json.loads((out / "quantize_config.json").read_text()) == qconfig
    source = AutoModelForCausalLM.from_pretrained(src).get_input_embeddings().weight
    assert torch.equal(load_file(out / "model.safetensors")["model.embed_tokens.weight"], source)


def test_untied_head_keeps_its_own_embeddings_at_runtime(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    out = tmp_path / "q"
    quantize(_opts(src, out, lm_head=True, group_size=32))
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["lm_head"] is True and "tied_embeddings" not in qconfig["meta"]
    model = load_model(str(out), device="cpu").model
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(model.get_input_embeddings().weight,
                       load_file(out / "model.safetensors")["model.embed_tokens.weight"])


@pytest.mark.parametrize("name,grid", [
    ("lm_head", (8, -1)),                        # the first matching pattern wins
    ("model.layers.0.mlp.down_proj", (4, 128)),  # excluded: no override (the module is not quantized)
    ("model.layers.1.mlp.up_proj", (3, 64)),     # a plain regular expression overrides too
    ("model.layers.1.mlp.down_proj", (4, 128)),  # no pattern matches
])
def test_module_grid_follows_gptqmodel_dynamic_overrides(name, grid):
    qconfig = {"dynamic": {"+:^lm_head$": {"bits": 8, "group_size": -1}, "lm_head": {"bits": 2},
                           "-:^model[.]layers[.]0[.]mlp[.]down_proj$": {},
                           r"^model[.]layers[.]1[.]mlp[.]up_proj$": {"bits": 3, "group_size": 64}}}
    assert module_grid(qconfig, name, 4, 128) == grid


def _head(bits: int, group: int, shuffled: bool = False, n: int = 192, k: int = 64) -> QuantLinear:
    g = torch.Generator().manual_seed(bits)
    groups = 1 if group <= 0 else k // group
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=g)
    scales = torch.rand(groups, n, generator=g) + 0.1
    g_idx = packing.default_g_idx(k, group)
    if shuffled:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return QuantLinear(q, zeros, scales, g_idx, None, bits, group)


@pytest.mark.parametrize("bits,group,shuffled,mode", [
    (4, 32, False, "int4"), (4, 32, True, "int4"), (4, -1, False, "int4"),
    (8, -1, False, "int8"), (3, 32, False, "dequant"), (8, 32, False, "dequant"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_from_head_returns_exactly_the_dequantized_rows(bits, group, shuffled, mode, dtype):
    head = _head(bits, group, shuffled)
    assert head.mode == mode and (head.perm is not None) == shuffled
    ids = torch.tensor([[0, 31, 32, 63], [64, 100, 191, 5]])
    w = head.dequantized_weight(torch.float32)        # columns in the kernel's order
    if head.perm is not None:                         # back to the checkpoint's column order
        w = torch.empty_like(w).index_copy_(1, head.perm, w)
    assert torch.equal(QuantEmbedding(head, dtype)(ids), w[ids].to(dtype))    # rounded once


def test_gemma3_embeddings_from_the_head_keep_the_sqrt_hidden_scale(tiny_model_dir, tmp_path):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    out = tmp_path / "q"
    quantize(_opts(tiny_model_dir("gemma3"), out, lm_head=True, method="rtn", group_size=32))
    model = load_model(str(out), device="cpu", dtype="bfloat16").model
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding)
    plain = Gemma3TextScaledWordEmbedding(emb.num_embeddings, emb.embedding_dim, 0, embed_scale=64 ** 0.5)
    plain.weight.data = model.lm_head.dequantized_weight(torch.float32).to(torch.bfloat16)
    plain.embed_scale = torch.tensor(64 ** 0.5)
    ids = torch.tensor([[1, 7, 300, 511]])
    assert torch.equal(emb(ids), plain(ids))


def test_tied_model_holds_the_table_once_quantized(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "q"
    quantize(_opts(tiny_model_dir("llama"), out, lm_head=True, group_size=32))
    served = load_model(str(out), device="cpu").model
    monkeypatch.setattr(runtime, "EMBEDDINGS_FROM_HEAD", False)
    kept = load_model(str(out), device="cpu").model
    table = kept.get_input_embeddings().weight
    assert type(kept.get_input_embeddings()) is torch.nn.Embedding and table.dtype == torch.float32
    assert weight_bytes(kept) - weight_bytes(served) == table.numel() * 4
    assert not any(p.numel() == table.numel() for p in served.parameters())


def test_info_counts_the_source_parameters_once_with_embeddings_served_from_the_head(tiny_model_dir, tmp_path,
                                                                                       cli):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    quantize(_opts(src, out, lm_head=True, group_size=32))
    code, stdout, err = cli("info", out, "--json")
    assert code == 0, err
    original = AutoModelForCausalLM.from_pretrained(src)
    assert json.loads(stdout)["parameters"] == sum(p.numel() for p in original.parameters())


def test_save_reload_generate_in_a_fresh_process(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    quantize(_opts(tiny_model_dir("llama"), out, lm_head=True, group_size=32))
    run = subprocess.run([sys.executable, "-m", "llmopt", "generate", str(out), "The module", "--max-new-tokens", "6",
                          "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    fresh = json.loads(run.stdout)
    loaded = load_model(str(out), device="cpu")
    ids = loaded.tokenizer("The module", return_tensors="pt").input_ids
    with torch.no_grad():
        tokens = loaded.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert fresh["text"] == loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def test_no_lm_head_keeps_the_head_and_tie_as_before(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    quantize(_opts(src, tmp_path / "plain", lm_head=False, group_size=32))
    quantize(_opts(src, tmp_path / "head", lm_head=True, group_size=32))
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    head = load_file(tmp_path / "head" / "model.safetensors")
    assert not any(k.startswith("lm_head") for k in plain)          # tied: written once, as embed_tokens
    assert set(head) - set(plain) == _HEAD_KEYS and set(plain) <= set(head)
    assert all(torch.equal(plain[k], head[k]) for k in plain)        # the head changes nothing else
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["quantization_config"]["lm_head"] is False
    assert "tied_embeddings" not in config["quantization_config"]["meta"]
    model = load_model(str(tmp_path / "plain"), device="cpu").model
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("args,overrides,match", [
    (["--method", "nf4", "--lm-head"], {}, "--lm-head does not apply to --method nf4"),
    (["--calib", "builtin", "--seq-len", "64", "--lm-head"], dict(hidden_size=48, head_dim=12), "--lm-head: the output head's widths"),
])
def test_bad_lm_head_exits_2_and_writes_nothing(args, overrides, match, tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama", **overrides)
    out = tmp_path / "out"
    code, _, err = cli("quantize", src, "-o", out, *args)
    assert code == 2, err
    assert match.lower() in " ".join(err.lower().split()), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_options_validate_alone_refuses_lm_head_for_bitsandbytes():
    with pytest.raises(UserError, match="--lm-head does not apply"):
        QuantizeOptions(model="m", output="o", method="llm-int8", lm_head=True).validate()
    QuantizeOptions(model="m", output="o", method="llm-int8", lm_head=False).validate()


@pytest.mark.slow
def test_smollm2_with_its_head_quantized_holds_at_most_035x_of_bfloat16(smollm2, tmp_path):
    from llmopt.info import count_parameters

    out = tmp_path / "smol"
    summary = quantize(QuantizeOptions(model="smollm2-135m", output=str(out), method="rtn", device="cpu",
                                       lm_head=True))
    assert summary["quantized_layers"] == 211 and summary["layers"][-1]["module"] == "lm_head"
    q = load_model(str(out), device="cpu")
    assert isinstance(q.model.get_input_embeddings(), QuantEmbedding)
    assert weight_bytes(q.model) <= 0.35 * 2 * count_parameters(smollm2.model)
    assert_close_to_original(q, smollm2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpacking_in_column_blocks_gives_the_codes_across_block_edges(bits, monkeypatch):
    monkeypatch.setattr(packing, "UNPACK_COLS", 7)
    codes = torch.randint(0, 1 << bits, (64, 30), generator=torch.Generator().manual_seed(bits)).to(torch.int32)
    packed = packing.pack_rows(codes, bits)
    assert torch.equal(packing.unpack_rows(packed, bits), codes)
    assert torch.equal(packing.unpack_rows(packed, bits, 40), codes[:40])


def test_recipe_takes_lm_head_from_the_same_options(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {src}\nout: {tmp_path / 'out'}\nsteps:\n  - quantize: {{method: nf4, lm_head: true}}\n")
    code, _, err = cli("run", recipe, "--dry-run")
    assert code == 2 and "--lm-head does not apply to --method nf4" in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_lm_head_refuses_a_head_gptq_cannot_calibrate(tiny_model_dir, monkeypatch):
    from llmopt.quantize import pipeline

    model = pipeline.meta_model(str(tiny_model_dir("llama")))
    monkeypatch.setattr(pipeline, "final_norm", lambda m: None)
    assert pipeline.head_plan(model, QuantizeOptions(model="m", output="o")) is None
    with pytest.raises(UserError, match="--lm-head: no final norm"):
        pipeline.head_plan(model, QuantizeOptions(model="m", output="o", lm_head=True))
    assert pipeline.head_plan(model, QuantizeOptions(model="m", output="o", method="rtn", lm_head=True)) == "lm_head"
