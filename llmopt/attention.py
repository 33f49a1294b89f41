"""transformers' SDPA attention, on one CPU thread when a call has only a few query tokens (decode) and
one thread measured faster.

A decode step's attention is one query row per head over the KV cache. PyTorch's CPU flash-attention
kernel still wakes every thread for it, and with OpenMP's passive waiting that can cost more than the
second thread saves, until the cache is about a megabyte (`benchmarks/decode_threads.py --attention`;
docs/runtime.md). `serve_attention` switches a model on transformers' "sdpa" to the same function
registered as "llmopt_sdpa", which runs such calls on one thread where `llmopt.one_thread` measured that
faster: the same kernel on the same tensors (its sums split differently by thread count, so results
agree to float rounding, about 1e-7 relative). The name is not saved with a checkpoint (transformers keeps
it out of config.json), so nothing written depends on it. Inside a compiled decode step
(`llmopt.compiled`) the choice is the eager steps' measurement where there is one, else the size alone;
a call that wants every thread is an opaque all-threads op."""

from __future__ import annotations

import functools

import torch

from llmopt import one_thread

NAME = "llmopt_sdpa"
# a CPU attention call with at most this many query tokens (a decode step has 1) over keys and values of at
# most this many bytes runs on one thread
ONE_THREAD_MAX_QUERIES = 8
ONE_THREAD_MAX_KV_BYTES = 1_500_000


def _one_thread(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Small enough that one thread may beat all (`llmopt.one_thread` measures whether it does)."""
    return (query.device.type == "cpu" and query.shape[-2] <= ONE_THREAD_MAX_QUERIES
            and _kv_bytes(key) <= ONE_THREAD_MAX_KV_BYTES)


def _kv_bytes(key: torch.Tensor) -> int:
    return 2 * key.numel() * key.element_size()


def _kind(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """What one measurement stands for: the shapes but the cache length, whose bytes count in doublings."""
    return "sdpa", tuple(query.shape), tuple(key.shape[:2]), key.dtype, mask is None, _kv_bytes(key).bit_length()


def _compiled_decode(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A compiled decode step's attention, or None where transformers' function must run. transformers folds
    a single query's heads onto their KV head (`pack_gqa`) only in eager mode and repeats keys and values
    in a compiled graph (3x the bytes read for SmolLM2); this folds them there too."""
    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    extras = {k for k, v in kwargs.items() if v is not None} - {"is_causal", "sliding_window"}
    if q_len != 1 or dropout or extras or query.device.type != "cpu":
        return None
    mask = attention_mask
    if mask is not None and mask.shape[1] != 1:          # a per-head mask does not fold
        return None
    scale = dim ** -0.5 if scaling is None else scaling
    folded = query.reshape(b, kv_heads, heads // kv_heads, dim)
    alone = one_thread.faster_alone(_kind(query, key, mask))        # as eager steps measured it, if they did
    if _one_thread(query, key) and alone is not False:      # the compiled step runs on one thread (llmopt.compiled)
        out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale)
    else:
        out = one_thread.sdpa(folded, key, value, mask, scale)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2), None


def _registered() -> bool:
    """Register NAME with transformers' attention and mask interfaces once; False where this transformers
    has neither (then models keep their own attention)."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if NAME not in AttentionInterface._global_mapping:
        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            if torch.compiler.is_compiling() and not args:
                done = _compiled_decode(module, query, key, value, attention_mask, **kwargs)
                if done is not None:
                    return done
            call = functools.partial(sdpa_attention_forward, module, query, key, value, attention_mask, *args,
                                     **kwargs)
            if _one_thread(query, key) and not torch.compiler.is_compiling() and torch.get_num_threads() > 1:
                return one_thread.call_small(_kind(query, key, attention_mask), call)
            return call()

        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def serve_attention(model: torch.nn.Module) -> bool:
    """Switch a CPU model that attends with "sdpa" to NAME; True when it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    if device.type != "cpu" or not _registered():
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
