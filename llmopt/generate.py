"""Streaming text generation with honest timing (time to first token, decode tokens/s).

transformers' `generate` does the decoding (greedy, sampling, beams, stop strings), with llmopt's
in-place growing KV cache when there is one beam (llmopt.kv_cache), whose one-token steps a LLaMA-family
or Gemma3 model takes through llmopt's own decode step (llmopt.decode_step); a small streamer turns token
ids into text as they arrive and timestamps the first and last token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmopt.errors import UserError, require
from llmopt.attention import serve_attention
from llmopt.decode_step import serve_decode
from llmopt.kv_cache import cache_kwargs
from llmopt.models import model_device


@dataclass
class GenerateOptions:
    prompt: str
    max_new_tokens: int = 128
    chat: bool = False
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(bool(self.prompt and self.prompt.strip()), "the prompt is empty",
                "pass a prompt argument, or '-' and text on stdin")
        for text, what in [(self.prompt, "the prompt")] + [(s, f"--stop {s!r}") for s in self.stop]:
            require(_is_utf8(text), f"{what} is not valid UTF-8", "pass text encoded as UTF-8")
        require(self.max_new_tokens > 0, f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        require(self.num_beams >= 1, f"--num-beams must be >= 1, got {self.num_beams}")


def _is_utf8(text: str) -> bool:
    """False for text holding undecodable bytes (argv and stdin carry them as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    tokens: list[int]
    ttft_s: float
    decode_tok_s: float | None
    total_s: float
    stop_reason: str


class _Streamer:
    """Receives token ids from `generate`; emits the new text and times the tokens."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False
        self.first: float | None = None
        self.last: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:       # the first call carries the prompt
            self.prompt_seen = True
            return
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.ids.extend(value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):   # half of a multi-byte character: wait
            return
        if self.on_text and len(text) > self.printed:
            self.on_text(text[self.printed:])
        self.printed = max(self.printed, len(text))


def build_inputs(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: this model's tokenizer has no chat template", hint="drop --chat")
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.inference_mode()
def generate(model, tokenizer, opts: GenerateOptions, on_text: Callable[[str], None] | None = None
             ) -> GenerateResult:
    """Generate a continuation of opts.prompt; `on_text` receives text pieces as they are decoded."""
    opts.validate()
    serve_attention(model)
    serve_decode(model)
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    ids = build_inputs(tokenizer, opts.prompt, opts.chat).to(model_device(model))
    kwargs: dict = dict(max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams,
                        repetition_penalty=opts.repetition_penalty, attention_mask=torch.ones_like(ids))
    if opts.temperature > 0:
        kwargs.update(do_sample=True, temperature=opts.temperature, top_k=opts.top_k or None, top_p=opts.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if opts.stop:
        kwargs.update(stop_strings=list(opts.stop), tokenizer=tokenizer)
    if tokenizer.pad_token_id is None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    streamer = _Streamer(tokenizer, on_text if opts.num_beams == 1 else None)
    if opts.num_beams == 1:
        kwargs.update(streamer=streamer, **cache_kwargs(model))
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    total = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    if opts.num_beams > 1 and on_text:
        on_text(text)
    first = streamer.first if streamer.first is not None else start + total
    last = streamer.last if streamer.last is not None else start + total
    decode = (len(new) - 1) / (last - first) if len(new) > 1 and last > first else None
    eos = set(_as_list(model.generation_config.eos_token_id)) | set(_as_list(tokenizer.eos_token_id))
    reason = "eos" if new and new[-1] in eos else ("length" if len(new) >= opts.max_new_tokens else "stop")
    return GenerateResult(text=text, prompt_tokens=ids.shape[1], new_tokens=len(new), tokens=new,
                          ttft_s=first - start, decode_tok_s=decode, total_s=total, stop_reason=reason)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
