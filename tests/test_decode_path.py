"""The decode-speed levers of llmopt's runtime change no result: fused sibling projections, the
in-place KV caches (full and sliding-window layers), and small kernel and attention calls on one thread."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from llmopt import attention, kv_cache, one_thread
from llmopt.generate import GenerateOptions, generate
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, qlinear, quantize, runtime
from llmopt.quantize.fusion import ProjectionSlice
from llmopt.quantize.qlinear import QuantLinear


def _gptq(src, out):
    quantize(QuantizeOptions(model=str(src), output=str(out), calib="builtin", nsamples=4, seq_len=32,
                             device="cpu", group_size=32))
    return out


def _load(path, fuse: bool, monkeypatch):
    monkeypatch.setattr(runtime, "FUSE_SIBLINGS", fuse)
    return load_model(str(path), device="cpu", head="full").model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])    # qwen2: q/k/v biases
def test_fused_siblings_give_the_unfused_logits(arch, tiny_model_dir, tmp_path, monkeypatch):
    out = _gptq(tiny_model_dir(arch), tmp_path / "q")
    plain, fused = _load(out, False, monkeypatch), _load(out, True, monkeypatch)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(isinstance(m, ProjectionSlice) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj,
                                                       mlp.up_proj))
    count = lambda m: sum(isinstance(x, QuantLinear) for x in m.modules())   # noqa: E731
    assert count(fused) == count(plain) - 3 * len(fused.model.layers)      # 5 Linears became 2 per layer
    ids = torch.randint(3, 500, (2, 140), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rows in (ids[:, :3], ids):          # the kernel path and the dequantize path (>= 128 rows)
            a, b = plain(rows).logits, fused(rows).logits
            assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max())), rows.shape


def test_a_sibling_called_out_of_turn_or_on_a_changed_input_computes_afresh(tiny_model_dir, tmp_path, monkeypatch):
    out = _gptq(tiny_model_dir("llama"), tmp_path / "q")
    plain = _load(out, False, monkeypatch).model.layers[0].self_attn
    fused = _load(out, True, monkeypatch).model.layers[0].self_attn
    x, other = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    with torch.no_grad():
        assert torch.equal(fused.k_proj(x), plain.k_proj(x))         # k before q: no stale slice
        assert torch.equal(fused.q_proj(other), plain.q_proj(other))
        assert torch.equal(fused.k_proj(x), plain.k_proj(x))         # not other's k
        fused.q_proj(x)
        x.add_(1.0)                                                   # changed in place between calls
        assert torch.equal(fused.v_proj(x), plain.v_proj(x))


def _greedy(model, ids, steps: int, cache) -> tuple[list[int], torch.Tensor]:
    key = kv_cache.cache_keyword(model)
    tokens, logits = [], []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **{key: cache})
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            out = model(input_ids=token, use_cache=True, **{key: cache})
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])     # gemma3: sliding-window layers beside full ones
def test_growing_cache_decodes_exactly_like_the_dynamic_cache(arch, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 4)         # grow several times within the run
    layers = 6 if arch == "gemma3" else 3              # gemma3: every sixth layer attends globally
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch, num_hidden_layers=layers)).eval()
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = kv_cache.growing_cache(model)
    assert any(isinstance(layer, kv_cache.GrowingLayer) for layer in cache.layers)
    if arch == "gemma3":
        assert any(isinstance(layer, kv_cache.SlidingLayer) for layer in cache.layers)
    got, got_logits = _greedy(model, ids, 70, cache)       # 110 tokens: the 32-token window moves over 3 times
    want, want_logits = _greedy(model, ids, 70, DynamicCache(config=model.config))
    assert got == want
    assert torch.equal(got_logits, want_logits)
    grown = [layer for layer in cache.layers if isinstance(layer, kv_cache.GrowingLayer)]
    assert grown[0].get_seq_length() == 40 + 70 and grown[0]._buffers[0].shape[-2] >= 110


def test_sliding_layer_returns_and_keeps_what_the_transformers_layer_does(monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 4)          # buffer of 12 tokens: moves every few steps
    ours, theirs = kv_cache.SlidingLayer(sliding_window=6), DynamicSlidingWindowLayer(sliding_window=6)
    buffers = set()
    for n in (3, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1):
        k = torch.randn(2, 1, n, 4)
        a, b = ours.update(k, -k), theirs.update(k, -k)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
        assert ours.get_seq_length() == theirs.get_seq_length()
        buffers.add(ours._buffers[0].data_ptr())
    assert len(buffers) == 2          # one buffer until the 9-token chunk outgrew it: single steps copy in place
    ours.reorder_cache(torch.tensor([1, 0]))
    theirs.reorder_cache(torch.tensor([1, 0]))
    k = torch.randn(2, 1, 1, 4)
    assert torch.equal(ours.update(k, -k)[0], theirs.update(k, -k)[0])


def test_growing_layer_follows_crop_and_reorder_like_dynamic_layer():
    grow, dyn = kv_cache.GrowingLayer(), DynamicLayer()
    steps = [torch.randn(2, 1, n, 4) for n in (5, 1, 1)]
    for k in steps:
        grow.update(k, -k)
        dyn.update(k, -k)
    grow.crop(-2)
    dyn.crop(-2)
    grow.reorder_cache(torch.tensor([1, 0]))
    dyn.reorder_cache(torch.tensor([1, 0]))
    for k in [torch.randn(2, 1, 3, 4), torch.randn(2, 1, 1, 4)]:
        a, b = grow.update(k, -k), dyn.update(k, -k)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert grow.get_seq_length() == dyn.get_seq_length() == 9


def test_generate_greedy_text_unchanged_by_the_growing_cache(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    opts = GenerateOptions(prompt="The module of the class", max_new_tokens=24)
    used = []
    real = kv_cache.growing_cache
    monkeypatch.setattr(kv_cache, "growing_cache", lambda m: used.append(1) or real(m))
    got = generate(model, tiny_tokenizer, opts).tokens
    monkeypatch.setattr(kv_cache, "growing_cache", lambda m: DynamicCache(config=m.config))
    want = generate(model, tiny_tokenizer, opts).tokens
    assert used and got == want


@pytest.fixture
def one_thread_measures_faster(monkeypatch):
    """Every small call's measurement says one thread (which CPU wins is llmopt.one_thread's to measure)."""
    monkeypatch.setattr(one_thread, "_faster_alone", {})
    monkeypatch.setattr(one_thread, "_measure", lambda fn, args: True)


@pytest.mark.parametrize("bits", [4, 8])
def test_small_kernel_calls_run_on_one_thread_and_large_ones_on_all(bits, two_threads, one_thread_measures_faster,
                                                                   monkeypatch):
    n, k = 128, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.int32, generator=gen)
    groups = 1 if bits == 8 else k // 32
    zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
    scales = torch.rand(groups, n, generator=gen) / 100
    g_idx = torch.zeros(k, dtype=torch.int32) if bits == 8 else torch.arange(k) // 32
    layer = QuantLinear(q, zeros, scales, g_idx, None, bits, -1 if bits == 8 else 32)
    assert layer.mode == f"int{bits}"
    seen = []
    name = f"_kernel_int{bits}"
    real = getattr(QuantLinear, name)
    monkeypatch.setattr(QuantLinear, name, lambda self, x: seen.append(torch.get_num_threads()) or real(self, x))
    x = torch.randn(16, k, generator=gen)
    one = layer(x[:1])
    many = layer(x)                                   # 16 rows > ONE_THREAD_MAX_ROWS
    monkeypatch.setattr(qlinear, "ONE_THREAD_MAX_BYTES", 0)
    big = layer(x[:1])                                # a weight over the byte limit
    assert seen == [1, 2, 2] and torch.get_num_threads() == 2
    assert torch.equal(one, big) and torch.allclose(one, many[:1], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_attention_runs_on_one_thread_with_the_same_logits(arch, tiny_model_dir, two_threads,
                                                                  one_thread_measures_faster, monkeypatch):
    from transformers import AutoModelForCausalLM

    layers = 6 if arch == "gemma3" else 2
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch, num_hidden_layers=layers)).eval()
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(2))
    want, want_logits = _greedy(model, ids, 12, kv_cache.growing_cache(model))
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append((q.shape[-2], torch.get_num_threads())) or real(q, *a, **k))
    assert attention.serve_attention(model) and model.config._attn_implementation == attention.NAME
    got, got_logits = _greedy(model, ids, 12, kv_cache.growing_cache(model))
    assert got == want      # the kernel splits the cache differently by thread count: float rounding apart
    assert torch.allclose(got_logits, want_logits, rtol=0, atol=1e-5 * float(want_logits.abs().max()))
    assert {t for q, t in seen if q > attention.ONE_THREAD_MAX_QUERIES} == {2}      # the 40-token prefill
    assert {t for q, t in seen if q <= attention.ONE_THREAD_MAX_QUERIES} == {1}     # each decode step
    assert torch.get_num_threads() == 2 and not attention.serve_attention(model)   # once is enough
    seen.clear()
    monkeypatch.setattr(attention, "ONE_THREAD_MAX_KV_BYTES", 0)                    # a cache over the limit
    _greedy(model, ids, 2, kv_cache.growing_cache(model))
    assert {t for _, t in seen} == {2}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])      # gemma3: past its sliding window, with a mask
def test_decode_attention_folds_the_query_heads_onto_their_kv_head(arch, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    layers = 6 if arch == "gemma3" else 2
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch, num_hidden_layers=layers)).eval()
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    ids = torch.randint(3, 500, (1, 30), generator=torch.Generator().manual_seed(3))
    want, want_logits = _greedy(model, ids, 12, kv_cache.growing_cache(model))
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append((tuple(q.shape), k.get("enable_gqa", False)))
                        or real(q, *a, **k))
    assert attention.serve_attention(model)
    got, got_logits = _greedy(model, ids, 12, kv_cache.growing_cache(model))
    decode = [s for s in seen if s[0][2] != 30]
    assert len(decode) >= 12 * layers          # (more where one_thread times a call on one thread and on all)
    assert set(decode) == {((1, kv_heads, heads // kv_heads, 16), False)}     # one kernel call per KV head
    assert got == want
    assert torch.allclose(got_logits, want_logits, rtol=0, atol=1e-5 * float(want_logits.abs().max()))


def test_generate_serves_one_thread_decode_attention(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    assert model.config._attn_implementation == "sdpa"
    generate(model, tiny_tokenizer, GenerateOptions(prompt="The module", max_new_tokens=3))
    assert model.config._attn_implementation == attention.NAME
