"""llmopt's own decode step (llmopt.decode_step) gives the model's own forward's logits, bit for bit, and
takes only the calls it computes exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmopt import decode_step, kv_cache
from llmopt.attention import serve_attention
from llmopt.generate import GenerateOptions, generate
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize


def _model(arch: str, tiny_model_dir, tmp_path, quantized: bool):
    # gemma3: 6 layers, every sixth attends globally, the others over a 32-token window
    src = tiny_model_dir(arch, **({"num_hidden_layers": 6} if arch == "gemma3" else {}))
    if not quantized:
        return AutoModelForCausalLM.from_pretrained(src).eval()
    out = tmp_path / "q"
    quantize(QuantizeOptions(model=str(src), output=str(out), calib="builtin", nsamples=4, seq_len=32,
                             device="cpu", group_size=32))
    return load_model(str(out), device="cpu", head="auto").model       # fused siblings, mixed int8/int4 head


def _decode(model, ids: torch.Tensor, steps: int, served: list | None = None) -> tuple[torch.Tensor, list]:
    """Greedy decode through model(...) with the growing cache: every step's logits, and the cache."""
    key = kv_cache.cache_keyword(model)
    cache = kv_cache.growing_cache(model)
    logits = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **{key: cache})
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, use_cache=True, **{key: cache})
    return torch.stack(logits), [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])  # qwen2: q/k/v biases; gemma3: windows, norms
@pytest.mark.parametrize("quantized", [False, True])
def test_served_step_gives_the_forward_logits_bit_for_bit(arch, quantized, tiny_model_dir, tmp_path,
                                                         monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 8)               # the cache grows during the run
    model = _model(arch, tiny_model_dir, tmp_path, quantized)
    serve_attention(model)
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    want, want_cache = _decode(model, ids, 30)                    # 39 tokens: past gemma3's window of 32
    taken = []
    real = decode_step.step
    monkeypatch.setattr(decode_step, "step", lambda *a: taken.append(1) or real(*a))
    assert decode_step.serve_decode(model)
    got, got_cache = _decode(model, ids, 30)
    assert len(taken) == 30                     # every decode call, not the prefill
    assert torch.equal(got, want)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got_cache, want_cache))


def test_generate_serves_decode_and_keeps_the_text(tiny_model_dir, tiny_tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    opts = GenerateOptions(prompt="The module of the class", max_new_tokens=20)
    monkeypatch.setattr(decode_step, "supported", lambda m: False)
    want = generate(model, tiny_tokenizer, opts).tokens
    monkeypatch.undo()
    taken = []
    real = decode_step.step
    monkeypatch.setattr(decode_step, "step", lambda *a: taken.append(1) or real(*a))
    got = generate(model, tiny_tokenizer, opts).tokens
    assert got == want and len(taken) == len(got) - 1


def test_calls_the_step_does_not_compute_take_the_model_forward(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    serve_attention(model)
    assert decode_step.serve_decode(model)
    taken = []
    real = decode_step.step
    monkeypatch.setattr(decode_step, "step", lambda *a: taken.append(1) or real(*a))
    key = kv_cache.cache_keyword(model)
    ids = torch.randint(3, 500, (2, 6), generator=torch.Generator().manual_seed(0))

    def filled(rows: int = 1):
        cache = kv_cache.growing_cache(model)
        model(input_ids=ids[:rows], use_cache=True, **{key: cache})
        return cache

    token = ids[:1, :1]
    model(input_ids=token, use_cache=True, **{key: filled()})                                   # with gradients
    with torch.inference_mode():
        model(input_ids=token, use_cache=True, **{key: kv_cache.growing_cache(model)})          # empty cache
        model(input_ids=ids[:1, :2], use_cache=True, **{key: filled()})                          # two tokens
        model(input_ids=ids[:, :1], use_cache=True, **{key: filled(2)})                          # two sequences
        model(input_ids=token, use_cache=True, output_hidden_states=True, **{key: filled()})
        model(input_ids=token, use_cache=True, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1]]),
              **{key: filled()})                                                                 # padding
        model(input_ids=token, use_cache=True, position_ids=torch.tensor([[3]]), **{key: filled()})
        model(input_ids=token, use_cache=True, **{key: kv_cache.DynamicCache(config=model.config)})
        assert not taken
        model(input_ids=token, use_cache=True, attention_mask=torch.ones(1, 7, dtype=torch.long),
              position_ids=torch.tensor([[6]]), **{key: filled()})                               # the next token
        assert len(taken) == 1


@pytest.mark.parametrize("overrides", [{"model_type": "mistral", "sliding_window": 16},   # not served: windows
                                       {"final_logit_softcapping": 30.0}])
def test_models_the_step_does_not_compute_keep_their_forward(overrides, tiny_tokenizer):
    from conftest import build_tiny

    model = build_tiny("gemma3" if "final_logit_softcapping" in overrides else "llama", tiny_tokenizer, **overrides)
    serve_attention(model)
    forward = model.forward
    assert not decode_step.serve_decode(model)
    assert model.forward == forward


def test_bench_timing_decodes_through_the_step(tiny_model_dir, monkeypatch):
    from llmopt.bench import speed

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    taken = []
    real = decode_step.step
    monkeypatch.setattr(decode_step, "step", lambda *a: taken.append(1) or real(*a))
    speed.time_generation(model, torch.arange(10, 26).view(1, 16), gen_len=5)
    assert len(taken) == 4                       # every token after the prefill's
