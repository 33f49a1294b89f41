"""`llmopt export`: GGUF files read back with gguf's own reader: metadata, tensor names and shapes, weights,
GPTQ blocks compared bit for bit with the checkpoint's dequantized weights, and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from llmopt.export import ExportOptions, export
from llmopt.quantize import QuantizeOptions, packing, quantize
from llmopt.quantize.runtime import read_tensors
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parent / "data"
GEMMA = dict(query_pre_attn_scalar=16)   # llama.cpp scales Gemma3 attention by head_dim


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _tensors(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def _weights(reader: GGUFReader, name: str) -> np.ndarray:
    """A tensor as the float32 rows llama.cpp computes with."""
    t = _tensors(reader)[name]
    rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
    return quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(rows, -1)


def _interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k (pairs instead of halves), built independently of llmopt's index."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _export(src, out, type_="auto", **kw) -> dict:
    return export(ExportOptions(model=str(src), output=str(out), type=type_, **kw))


def _quantized(src: Path, out: Path, **kw) -> Path:
    opts = dict(model=str(src), output=str(out), method="rtn", group_size=32, device="cpu")
    opts.update(kw)
    quantize(QuantizeOptions(**opts))
    return out


@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("qwen2", "qwen2"), ("gemma3", "gemma3")])
def test_f32_round_trip_holds_metadata_names_shapes_and_weights(arch, gguf_arch, tiny_model_dir, tmp_path):
    extra = GEMMA if arch == "gemma3" else {}
    src = tiny_model_dir(arch, **extra)
    summary = _export(src, tmp_path / "m.gguf", "f32")
    r = GGUFReader(tmp_path / "m.gguf")
    cfg = json.loads((src / "config.json").read_text())
    assert _field(r, "general.architecture") == gguf_arch
    assert _field(r, f"{gguf_arch}.block_count") == cfg["num_hidden_layers"]
    assert _field(r, f"{gguf_arch}.attention.head_count") == cfg["num_attention_heads"]
    assert _field(r, f"{gguf_arch}.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _field(r, f"{gguf_arch}.feed_forward_length") == cfg["intermediate_size"]
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(r, "tokenizer.ggml.tokens")) == cfg["vocab_size"]
    assert _field(r, "tokenizer.ggml.eos_token_id") == 2
    names = _tensors(r)
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.2.ffn_down.weight"} <= set(names)
    assert ("output.weight" in names) == (not cfg["tie_word_embeddings"])
    assert list(names["blk.1.ffn_gate.weight"].shape) == [cfg["hidden_size"], cfg["intermediate_size"]]
    assert summary["type"] == "f32" and summary["file_bytes"] == (tmp_path / "m.gguf").stat().st_size

    sd = load_file(src / "model.safetensors")
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    expect_q = _interleave(q, cfg["num_attention_heads"]) if arch == "llama" else q
    assert np.array_equal(_weights(r, "blk.1.attn_q.weight"), expect_q.numpy())
    assert np.array_equal(_weights(r, "blk.1.ffn_up.weight"), sd["model.layers.1.mlp.up_proj.weight"].numpy())
    norm = sd["model.layers.0.input_layernorm.weight"] + (1.0 if arch == "gemma3" else 0.0)
    assert np.array_equal(_weights(r, "blk.0.attn_norm.weight").ravel(), norm.numpy())
    if arch == "qwen2":
        assert np.array_equal(_weights(r, "blk.0.attn_k.bias").ravel(), sd["model.layers.0.self_attn.k_proj.bias"].numpy())
    if arch == "gemma3":
        assert _field(r, "gemma3.attention.sliding_window") == cfg["sliding_window"]
        assert list(_field(r, "gemma3.attention.sliding_window_pattern")) == \
            [t == "sliding_attention" for t in cfg["layer_types"]]


def test_pruned_widths_come_from_the_config(tiny_model_dir, tmp_path):
    """Two query heads and one KV head of 16 (32 wide, not hidden 64), MLP 96: as a pruned model stores them."""
    src = tiny_model_dir("llama", num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=96)
    _export(src, tmp_path / "p.gguf", "f16")
    r = GGUFReader(tmp_path / "p.gguf")
    assert _field(r, "llama.attention.head_count") == 2 and _field(r, "llama.attention.head_count_kv") == 1
    assert _field(r, "llama.attention.key_length") == 16 and _field(r, "llama.rope.dimension_count") == 16
    assert _field(r, "llama.feed_forward_length") == 96
    names = _tensors(r)
    assert list(names["blk.0.attn_q.weight"].shape) == [64, 32]
    assert list(names["blk.0.attn_k.weight"].shape) == [64, 16]
    assert names["blk.0.attn_q.weight"].tensor_type == T.F16


def _checkpoint_weight(ckpt: Path, module: str) -> np.ndarray:
    """The checkpoint's weight dequantized by llmopt's own packing code, in float32."""
    cfg = json.loads((ckpt / "config.json").read_text())
    q = cfg["quantization_config"]
    t = read_tensors(ckpt)
    tensors = {k: t[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    k, n = tensors["qweight"].shape[0] * 32 // q["bits"], tensors["qweight"].shape[1]
    codes, zeros, scales, g_idx = packing.unpack_layer(tensors, q["bits"], q["checkpoint_format"], k, n, q["group_size"])
    return packing.dequantize(codes, zeros, scales, g_idx).numpy()


LAYERS = [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", 4),
          ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", 2),
          ("model.layers.2.mlp.down_proj", "blk.2.ffn_down.weight", None)]


def test_gptq_g32_symmetric_is_q4_0_bit_exact(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    ckpt = _quantized(src, tmp_path / "q", method="gptq", calib="builtin", nsamples=4, seq_len=32)
    summary = _export(ckpt, tmp_path / "q.gguf")
    assert summary["type"] == "q4_0" and summary["mappings"] == {"exact": summary["gptq_layers"]}
    assert summary["max_abs_error"] == 0.0
    r = GGUFReader(tmp_path / "q.gguf")
    for module, name, heads in LAYERS:
        assert _tensors(r)[name].tensor_type == T.Q4_0
        want = _checkpoint_weight(ckpt, module)
        want = _interleave(torch.from_numpy(want), heads).numpy() if heads else want
        assert np.array_equal(_weights(r, name), want), name
    assert _tensors(r)["token_embd.weight"].tensor_type == T.Q8_0      # tied output: llama.cpp's Q8_0 here
    assert _tensors(r)["blk.0.attn_norm.weight"].tensor_type == T.F32


def test_gptq_g32_asymmetric_is_q4_1_with_its_codes(tiny_model_dir, tmp_path):
    """Q4_1 keeps GPTQ's codes and scales; only the minimum -s*z is rounded to fp16 (at most half its step)."""
    src = tiny_model_dir("qwen2")
    ckpt = _quantized(src, tmp_path / "q", sym=False)
    summary = _export(ckpt, tmp_path / "q.gguf")
    assert summary["type"] == "q4_1"
    assert set(summary["mappings"]) <= {"exact", "codes"} and "requantized" not in summary["mappings"]
    r = GGUFReader(tmp_path / "q.gguf")
    got, want = _weights(r, "blk.0.ffn_up.weight"), _checkpoint_weight(ckpt, "model.layers.0.mlp.up_proj")
    # |m| = s*z stays within max|w| + s <= 2 max|w|, and fp16 rounds it by at most 2^-11 of that
    bound = float(np.finfo(np.float16).eps) * np.abs(want).max() * (1 + 1e-5)
    assert 0 < np.abs(got - want).max() <= bound
    assert summary["max_abs_error"] <= bound
    assert _tensors(r)["output.weight"].tensor_type == T.Q8_0


@pytest.mark.parametrize("name,exact", [("gptqmodel-g32-sym", True), ("gptqmodel-g32-asym", False),
                                        ("gptqmodel-g32-sym-descact", False)])
def test_gptqmodel_checkpoints_map_onto_its_own_dequantized_weights(name, exact, tmp_path, tiny_tokenizer):
    """GPTQModel's own dequantized weights are the oracle (float16 products of float16 scales and codes, so
    an exact float32 weight rounds to them bit for bit); act-order without static groups scatters g_idx
    inside every block of 32, so it cannot map exactly and is re-rounded, and says so."""
    src = tmp_path / name
    shutil.copytree(DATA / name, src)
    _small_tokenizer().save_pretrained(src)
    summary = _export(src, tmp_path / "g.gguf", "q4_0")
    reference = load_file(DATA / f"{name}.reference.safetensors")["weight.model.layers.1.mlp.down_proj"]
    got = _weights(GGUFReader(tmp_path / "g.gguf"), "blk.1.ffn_down.weight")
    if exact:
        assert summary["mappings"] == {"exact": summary["gptq_layers"]}
        assert np.array_equal(got.astype(np.float16), reference.numpy())
    else:
        assert summary["mappings"] == {"requantized": summary["gptq_layers"]} and summary["max_abs_error"] > 0
        assert not np.array_equal(got.astype(np.float16), reference.numpy())


def _small_tokenizer():
    """A byte-level BPE of 128 tokens, for the GPTQModel fixtures' 128-row embeddings."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60)
    tok.train_from_iterator(list(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_group_16_is_requantized_and_reports_its_error(tiny_model_dir, tmp_path):
    ckpt = _quantized(tiny_model_dir("llama"), tmp_path / "q", group_size=16)
    summary = _export(ckpt, tmp_path / "q.gguf")
    assert summary["type"] == "q4_0" and summary["mappings"] == {"requantized": summary["gptq_layers"]}
    assert 0 < summary["max_rel_error"] < 0.5


def test_int8_checkpoint_is_q8_0_exact(tiny_model_dir, tmp_path):
    ckpt = _quantized(tiny_model_dir("gemma3", **GEMMA), tmp_path / "q", method="int8", group_size=128)
    summary = _export(ckpt, tmp_path / "q.gguf")
    assert summary["type"] == "q8_0" and summary["mappings"] == {"exact": summary["gptq_layers"]}


@pytest.mark.parametrize("case", ["type", "coarser", "suffix", "arch", "gemma-scale", "exists"])
def test_bad_input_exits_2_and_writes_nothing(case, tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("gemma3") if case == "gemma-scale" else tiny_model_dir("llama")
    out, args = tmp_path / "o" / "x.gguf", []
    if case == "type":
        args = ["--type", "q5_k"]
    elif case == "coarser":
        src = _quantized(src, tmp_path / "q8", method="int8", group_size=128)
        args = ["--type", "q4_0"]
    elif case == "suffix":
        out = tmp_path / "o" / "x.bin"
    elif case == "arch":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral"}))
    elif case == "exists":
        out.parent.mkdir()
        out.write_bytes(b"GGUF mine")
        args = ["--force"]
    code, _, err = cli("export", src, "-o", out, *args)
    assert code == 2, err
    assert "error" in err
    if case == "exists":
        assert out.read_bytes() == b"GGUF mine" and sorted(p.name for p in out.parent.iterdir()) == ["x.gguf"]
    else:
        assert not out.parent.exists()


def test_existing_export_needs_force_and_force_replaces_it(tiny_model_dir, tmp_path, cli):
    src, out = tiny_model_dir("llama"), tmp_path / "m.gguf"
    assert cli("export", src, "-o", out, "--type", "f16")[0] == 0
    before = out.read_bytes()
    code, _, err = cli("export", src, "-o", out, "--type", "q8_0")
    assert code == 2 and "--force" in err and out.read_bytes() == before
    code, stdout, _ = cli("export", src, "-o", out, "--type", "q8_0", "--force", "--json")
    assert code == 0 and json.loads(stdout)["type"] == "q8_0"
    assert _tensors(GGUFReader(out))["blk.0.attn_q.weight"].tensor_type == T.Q8_0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_llama3_rope_writes_its_frequency_factors(tiny_model_dir, tmp_path):
    """Llama 3's rope scaling lives in llama.cpp's rope_freqs tensor: 1 for high frequencies (wavelength
    under old_context / high_freq_factor), `factor` for low ones, smooth between."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = tiny_model_dir("llama", rope_parameters=rope)
    _export(src, tmp_path / "r.gguf", "f16")
    factors = _weights(GGUFReader(tmp_path / "r.gguf"), "rope_freqs.weight").ravel()
    wavelen = 2 * np.pi * 10000.0 ** (np.arange(0, 16, 2) / 16)
    assert len(factors) == 8
    assert np.allclose(factors[wavelen < 16], 1.0) and np.allclose(factors[wavelen > 64], 8.0)
    middle = factors[(wavelen >= 16) & (wavelen <= 64)]
    assert ((middle > 1.0) & (middle < 8.0)).all()
