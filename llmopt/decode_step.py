"""One decode step of a LLaMA-family model without transformers' per-call machinery (`serve_decode`).

At batch 1 a small model's step is a few hundred tiny calls, and what transformers wraps around them
(keyword deprecation, output capture, mask building, the attention interface, per-layer dispatch) took
2-8 ms of each token of SmolLM2-135M on a 2-core CPU, 10-18% of its 4-bit step and 3-10% of the float32
original's (`benchmarks/decode_step.py`, docs/runtime.md). For one new token of one sequence over
llmopt's growing cache, `step` calls the model's own modules for everything that holds weights (the
embedding, norms, projections, MLP, head) and its rotary table, and writes out only the glue: the rotary
rotation, the cache write, attention over the cache, the residual sums. The logits are the model's own
forward's (tests/test_decode_step.py). Every other call, and any model whose layers are not LLaMA's
(Gemma3's extra norms and scalings, sliding windows), runs the model's own forward.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from llmopt.attention import decode_attention
from llmopt.kv_cache import GrowingLayer
from llmopt.quantize.fusion import outputs

# decoder layers whose forward is LLaMA's: norm, attention with rotary q/k, residual, norm, MLP, residual
LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")
_ATTENTION = ("sdpa", "llmopt_sdpa")      # `decode_attention` is their arithmetic
_SERVED = "_llmopt_decode_step"
_KEYWORDS = {"input_ids", "cache", "past_key_values", "use_cache", "attention_mask", "position_ids",
             "cache_position", "logits_to_keep", "return_dict", "output_attentions", "output_hidden_states"}


def supported(model: torch.nn.Module) -> bool:
    """Whether `step` computes this model's forward: a CPU causal LM of LLaMA's layers, full attention."""
    config, inner = getattr(model, "config", None), getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if config is None or layers is None or not hasattr(model, "lm_head") or model.training:
        return False
    if config._attn_implementation not in _ATTENTION or getattr(config, "sliding_window", None) is not None:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "attn_logit_softcapping")):
        return False
    if len(layers) != config.num_hidden_layers or not all(type(l).__name__ in LAYERS for l in layers):
        return False
    if any(getattr(l.self_attn, "sliding_window", None) is not None or not all(
            hasattr(l.mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) for l in layers):
        return False
    try:
        return next(model.parameters()).device.type == "cpu" and all(
            hasattr(inner, n) for n in ("embed_tokens", "norm", "rotary_emb"))
    except StopIteration:
        return False


def serve_decode(model: torch.nn.Module) -> bool:
    """Route the model's one-token decode calls over llmopt's growing cache to `step` (the model object's
    own forward, not its class's: nothing saved changes); True when the model is served so."""
    if getattr(model, _SERVED, False):
        return True
    if not supported(model):
        return False
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cache = None if args or torch.compiler.is_compiling() else _one_token_step(kwargs)
        if cache is None:
            return original(*args, **kwargs)
        logits = step(model, kwargs["input_ids"], cache)
        return _output(logits, cache)

    model.forward = forward
    setattr(model, _SERVED, True)
    return True


def _output(logits: torch.Tensor, cache: DynamicCache) -> CausalLMOutputWithPast:
    """transformers' causal-LM output, the cache under the field name this version uses."""
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return CausalLMOutputWithPast(logits=logits, **{"cache" if "cache" in fields else "past_key_values": cache})


def _one_token_step(kwargs: dict) -> DynamicCache | None:
    """The growing cache of a call `step` computes exactly: one token of one sequence after a filled cache,
    without gradients, nothing asked for but the logits, positions and mask (if given) those of the next
    token; else None."""
    if not set(kwargs) <= _KEYWORDS or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
        return None
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or torch.is_grad_enabled():
        return None
    ids, cache = kwargs.get("input_ids"), kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(ids, torch.Tensor) or ids.shape != (1, 1) or not isinstance(cache, DynamicCache):
        return None
    if not cache.layers or not all(type(layer) is GrowingLayer and layer.is_initialized for layer in cache.layers):
        return None
    n = cache.get_seq_length()
    if n == 0 or kwargs.get("logits_to_keep", 0) not in (0, 1):
        return None
    mask, positions, slots = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("cache_position")
    if mask is not None and (mask.shape != (1, n + 1) or not bool(mask.all())):
        return None
    for given in (positions, slots):
        if given is not None and (given.numel() != 1 or int(given) != n):
            return None
    return cache


def step(model: torch.nn.Module, token: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits [1, 1, vocab] of `token` ([1, 1]) after the `cache`d tokens, which it appends to the cache."""
    inner = model.model
    n = cache.get_seq_length()
    h = inner.embed_tokens(token)
    cos, sin = inner.rotary_emb(h, torch.tensor([[n]], device=h.device))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for layer, cached in zip(inner.layers, cache.layers):
        h = _layer(layer, h, cos, sin, cached)
    return model.lm_head(inner.norm(h))


def _layer(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           cached: GrowingLayer) -> torch.Tensor:
    """LLaMA's decoder layer for one token: the same operations on the same values as its forward."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    dim = attn.head_dim
    q, k, v = (y.view(1, 1, -1, dim).transpose(1, 2) for y in outputs((attn.q_proj, attn.k_proj, attn.v_proj), x))
    heads = q.shape[1]
    qk = torch.cat([q, k], dim=1)                       # rotated together: one set of element-wise calls
    half = dim // 2
    qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
    keys, values = cached.update(qk[:, heads:], v)
    out = decode_attention(qk[:, :heads], keys, values, attn.scaling)
    h = h + attn.o_proj(out.reshape(1, 1, -1))
    mlp = layer.mlp
    gate, up = outputs((mlp.gate_proj, mlp.up_proj), layer.post_attention_layernorm(h))
    return h + mlp.down_proj(mlp.act_fn(gate) * up)
