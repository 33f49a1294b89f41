"""transformers' SDPA attention for CPU decode: the query heads folded onto their KV head, on one thread
when that measured faster.

A decode step's attention is one query row per head over the KV cache. transformers hands a grouped-query
model's heads to SDPA as they are (`enable_gqa`, or keys and values repeated in a compiled graph); for one
query token over a small cache llmopt folds each KV head's query heads into its query length, so one
kernel call reads each KV head once (`_decode`, `benchmarks/decode_attention.py`). PyTorch's CPU
flash-attention kernel still wakes every thread for it, and with OpenMP's passive waiting that can cost
more than the second thread saves, until the cache is about a megabyte (`benchmarks/decode_threads.py
--attention`; docs/runtime.md). `serve_attention` switches a model on transformers' "sdpa" to the same
function registered as "llmopt_sdpa", which folds such calls and runs them on one thread where
`llmopt.one_thread` measured that faster. The sums are split differently, so results agree with
transformers' to float rounding (about 1e-7 relative). The name is not saved with a checkpoint
(transformers keeps it out of config.json), so nothing written depends on it. Inside a compiled decode
step (`llmopt.compiled`) the thread choice is the eager steps' measurement where there is one, else the
size alone; a call that wants every thread is an opaque all-threads op."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llmopt import one_thread

NAME = "llmopt_sdpa"
# a CPU attention call with at most this many query tokens (a decode step has 1) over keys and values of at
# most this many bytes runs on one thread
ONE_THREAD_MAX_QUERIES = 8
ONE_THREAD_MAX_KV_BYTES = 1_500_000
# the keywords transformers' SDPA function acts on (it ignores the others a model passes, e.g. position_ids)
_CHANGES_SDPA = ("softcap", "output_attentions", "position_bias")


def _one_thread(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Small enough that one thread may beat all (`llmopt.one_thread` measures whether it does)."""
    return (query.device.type == "cpu" and query.shape[-2] <= ONE_THREAD_MAX_QUERIES
            and _kv_bytes(key) <= ONE_THREAD_MAX_KV_BYTES)


def _kv_bytes(key: torch.Tensor) -> int:
    return 2 * key.numel() * key.element_size()


def _kind(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """What one measurement stands for: the shapes but the cache length, whose bytes count in doublings."""
    return "sdpa", tuple(query.shape), tuple(key.shape[:2]), key.dtype, mask is None, _kv_bytes(key).bit_length()


def _decode(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A CPU decode step's attention with the query heads folded onto their KV head, or None where
    transformers' function must run. Eager calls run on one thread where `one_thread` measured that
    faster; a compiled step follows the eager measurement where there is one."""
    if not _folds(query, key, attention_mask, dropout, kwargs):
        return None
    b, heads, _, dim = query.shape
    kv_heads, mask = key.shape[1], attention_mask
    scale = dim ** -0.5 if scaling is None else scaling
    folded = query.reshape(b, kv_heads, heads // kv_heads, dim)
    kind = _kind(query, key, mask)
    if not torch.compiler.is_compiling():
        call = functools.partial(F.scaled_dot_product_attention, folded, key, value, attn_mask=mask, scale=scale)
        out = one_thread.call_small(kind, call) if torch.get_num_threads() > 1 else call()
    elif one_thread.faster_alone(kind) is not False:          # the compiled step runs on one thread
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale)
    else:
        out = one_thread.sdpa(folded, key, value, mask, scale)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2), None


def _folds(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float,
           kwargs: dict) -> bool:
    """One query token on CPU over a cache small enough for one thread, its heads a multiple of the KV heads,
    a mask shared by all heads (a per-head one does not fold), nothing asked of transformers' function beyond
    plain attention. Over a larger cache a folded call lost its parallelism where there is one KV head
    (Gemma3-270M, 2048 tokens on 2 threads: 0.55x of transformers' call), so those keep transformers'."""
    if query.shape[2] != 1 or dropout or not _one_thread(query, key) or query.shape[1] % key.shape[1]:
        return False
    if any(kwargs.get(k) is not None and kwargs[k] is not False for k in _CHANGES_SDPA):
        return False
    return mask is None or mask.shape[1] == 1


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
            done = None if args else _decode(module, query, key, value, attention_mask, **kwargs)
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
