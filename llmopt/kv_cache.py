"""A KV cache that grows in place, for llmopt's own decoding (generate, bench).

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, which copies the
whole cache every token: at a 512-token prompt that was about a third of a 4-bit SmolLM2 decode step
on CPU (docs/runtime.md). `StaticCache` avoids the copy but attends over its whole preallocated length.
`GrowingLayer` keeps a buffer with spare room, doubling it when full, writes each step's keys in place
and hands attention a view of the filled part: amortized O(1) copying per token, and attention sees
exactly the tokens it would with the dynamic cache. `SlidingLayer` does the same for sliding-window
layers (Gemma3's), whose transformers class concatenates and slices its window every token.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

MIN_CAPACITY = 256      # tokens a layer's buffer holds at first


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` whose keys/values are views of a buffer with room to grow. A method of the base
    class that replaces `keys` (beam reordering, batch selection) is followed by a fresh buffer; one
    that narrows it (`crop`) keeps writing into the same buffer."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), key_states.shape[-2]
        if not self._fits(n + m, key_states):
            self._grow(n + m, key_states, value_states)
        kb, vb = self._buffers
        kb[..., n:n + m, :].copy_(key_states)
        vb[..., n:n + m, :].copy_(value_states)
        self.keys, self.values = kb[..., :n + m, :], vb[..., :n + m, :]
        return self.keys, self.values

    def _fits(self, length: int, key_states: torch.Tensor) -> bool:
        """Whether the current buffer still backs `keys` and has room for `length` tokens of this shape."""
        if self._buffers is None:
            return False
        kb = self._buffers[0]
        backed = self.get_seq_length() == 0 or self.keys.data_ptr() == kb.data_ptr()
        same = kb.shape[:-2] == key_states.shape[:-2] and kb.shape[-1] == key_states.shape[-1]
        return backed and same and kb.dtype == key_states.dtype and kb.device == key_states.device \
            and length <= kb.shape[-2]

    def _grow(self, length: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n = self.get_seq_length()
        capacity = max(MIN_CAPACITY, 2 * length)
        kb = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1])
        vb = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1])
        if n:
            kb[..., :n, :].copy_(self.keys)
            vb[..., :n, :].copy_(self.values)
        self._buffers = (kb, vb)

    def reset(self) -> None:
        self._buffers = None
        super().reset()


class SlidingLayer(DynamicSlidingWindowLayer):
    """`DynamicSlidingWindowLayer` whose kept `sliding_window - 1` tokens are a view of a buffer of at
    least twice the window: a step writes its keys after them in place and attention gets a view of the
    kept tokens plus the new ones (what the base class returns); the kept tokens move to the front of the
    buffer once per window's worth of steps, not every step. Past recording (assisted decoding) is left
    to the base class."""

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__(sliding_window, **kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._start = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record_past:
            self._buffers = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        self.cumulative_length += m
        if not self._fits(n, m, key_states):
            self._place(n, m, key_states, value_states)
        (kb, vb), s = self._buffers, self._start
        kb[..., s + n:s + n + m, :].copy_(key_states)
        vb[..., s + n:s + n + m, :].copy_(value_states)
        self._start = s + n + m - min(n + m, self.sliding_window - 1)
        self.keys, self.values = kb[..., self._start:s + n + m, :], vb[..., self._start:s + n + m, :]
        return kb[..., s:s + n + m, :], vb[..., s:s + n + m, :]

    def _fits(self, n: int, m: int, key_states: torch.Tensor) -> bool:
        """Whether the buffer still backs `keys` and has room after them for `m` tokens of this shape."""
        if self._buffers is None:
            return False
        kb = self._buffers[0]
        backed = n == 0 or self.keys.data_ptr() == kb[..., self._start, :].data_ptr()
        same = kb.shape[:-2] == key_states.shape[:-2] and kb.shape[-1] == key_states.shape[-1]
        return backed and same and kb.dtype == key_states.dtype and kb.device == key_states.device \
            and self._start + n + m <= kb.shape[-2]

    def _place(self, n: int, m: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Put the kept tokens at the front of a buffer with room for `m` more: the same buffer when it is
        large enough and still the one in use, else a new one."""
        old, kept = self._buffers, (self.keys, self.values) if n else None
        if old is None or not self._fits(n, 0, key_states) or n + m > old[0].shape[-2]:
            capacity = max(MIN_CAPACITY, 2 * max(n + m, self.sliding_window))
            old = tuple(t.new_empty(*t.shape[:-2], capacity, t.shape[-1]) for t in (key_states, value_states))
        if kept is not None:
            kept = tuple(t.clone() for t in kept)         # the front of the buffer may overlap them
            old[0][..., :n, :].copy_(kept[0])
            old[1][..., :n, :].copy_(kept[1])
        self._buffers, self._start = old, 0

    def reset(self) -> None:
        self._buffers, self._start = None, 0
        super().reset()


def growing_cache(model: torch.nn.Module) -> DynamicCache:
    """A `DynamicCache` for `model` whose full-attention layers grow in place (`GrowingLayer`) and whose
    sliding-window layers write in place (`SlidingLayer`)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer
                    else SlidingLayer(layer.sliding_window) if type(layer) is DynamicSlidingWindowLayer
                    else layer for layer in cache.layers]
    return cache


def cache_keyword(model: torch.nn.Module) -> str:
    """The cache keyword this transformers version reads: `cache` in newer 5.x (`past_key_values`
    deprecated there), `past_key_values` in earlier ones."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module) -> dict:
    """A fresh growing cache under `cache_keyword`."""
    return {cache_keyword(model): growing_cache(model)}
