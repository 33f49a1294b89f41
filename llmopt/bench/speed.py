"""Latency and memory of generation, measured so that two models can be compared honestly.

Timing: a hand-written greedy decode loop with a KV cache (llmopt's in-place growing cache, one-thread
decode attention and own decode step, as in `generate`; one prefill forward over the prompt, then one
forward per new token), so the figure is the model's cost and not the
variance of `generate()`'s bookkeeping. The prompt is real text, the same token ids for every model
that shares a tokenizer, and exactly `gen_len` tokens are produced (no early stop on EOS), so every
model does the same work. All models are measured in one process, in interleaved rounds after
warm-up rounds, the order alternating from round to round (A, B, B, A, A, B, ...); ratios to the
baseline are taken round by round. On CUDA
every time stamp is taken after `torch.cuda.synchronize`.

Memory: each model is loaded again in a fresh child process (spawned, so it inherits nothing) that
generates once with the same prompt; on CPU we read the peak resident set size (VmHWM in
/proc/self/status, Linux) at the end, on CUDA `torch.cuda.max_memory_allocated`. A shared process
could not tell one model's memory from another's.
"""

from __future__ import annotations

import gc
import inspect
import multiprocessing
import queue
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llmopt import compiled
from llmopt.attention import serve_attention
from llmopt.decode_step import serve_decode
from llmopt.info import weight_bytes
from llmopt.kv_cache import cache_kwargs
from llmopt.models import model_device
from llmopt.progress import SILENT, Progress


@dataclass
class Timing:
    """One generation: prefill (time to first token) and the decode of the remaining tokens."""

    ttft_s: float
    decode_s: float
    prompt_tokens: int        # per sequence
    new_tokens: int           # per sequence, including the first one produced by the prefill
    batch: int

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        """Decoded tokens per second over all sequences (tokens after the first / decode time)."""
        return self.batch * (self.new_tokens - 1) / self.decode_s


def memory_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """The machine's memory bandwidth in GB/s, STREAM-copy style: bytes read plus bytes written by one
    large tensor copy (far larger than any cache), best of `repeats`; decode at batch 1 reads every
    weight once per token, so this is the ceiling its weights GB/s can approach."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                               # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill_kwargs(model) -> dict:
    """Ask for the last position's logits only, as generate() does, when the model supports it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def fresh_cache(model) -> dict:
    """The prefill's cache keyword: an empty llmopt cache, or, for a model that keeps its own decode
    state (llama.cpp, `llmopt.bench.llamacpp`), what that model asks for."""
    own = getattr(model, "fresh_cache", None)
    return own() if own is not None else cache_kwargs(model)


def next_step(out) -> dict:
    """The keyword that feeds a forward's KV cache to the next one. Newer transformers 5.x name it
    `cache` (and deprecate `past_key_values`, to be removed), earlier 5.x only `past_key_values`."""
    key = "cache" if "cache" in out else "past_key_values"
    return {key: out[key]}


def time_generation(model, prompt: torch.Tensor, gen_len: int, compiled: bool = False) -> Timing:
    """Greedy-decode `gen_len` tokens after `prompt` ([batch, prompt_len]) with a KV cache, attention
    served as `generate` serves it (`llmopt.attention`); time it. `compiled`: decode steps through the
    compiled forward over a static cache (`llmopt.compiled`; compile it first with `compiled.warm_up`). A
    model with a `time_apart` timer (llama.cpp in bench: `llamacpp_timer`) is timed by it, in a process of
    its own."""
    apart = getattr(model, "time_apart", None)
    if apart is not None:
        ttft_s, decode_s = apart(prompt, gen_len)
        return Timing(ttft_s=ttft_s, decode_s=decode_s, prompt_tokens=prompt.shape[1], new_tokens=gen_len,
                      batch=prompt.shape[0])
    serve_attention(model)
    serve_decode(model)
    device = model_device(model)
    ids = prompt.to(device)
    timed = _timed_compiled if compiled else _timed_eager
    _sync(device)
    start = time.perf_counter()
    first = timed(model, ids, gen_len, lambda: _sync(device))
    _sync(device)
    end = time.perf_counter()
    return Timing(ttft_s=first - start, decode_s=end - first, prompt_tokens=ids.shape[1], new_tokens=gen_len,
                  batch=ids.shape[0])


@torch.inference_mode()
def _timed_eager(model, ids: torch.Tensor, gen_len: int, sync) -> float:
    """Prefill and decode with llmopt's growing cache; the time stamp of the first token."""
    out = model(input_ids=ids, use_cache=True, **fresh_cache(model), **_prefill_kwargs(model))
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    first = time.perf_counter()
    for _ in range(gen_len - 1):
        out = model(input_ids=token, use_cache=True, **next_step(out))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return first


@torch.no_grad()       # not inference mode: compiled graphs cannot trace inference tensors
def _timed_compiled(model, ids: torch.Tensor, gen_len: int, sync) -> float:
    cache = compiled.static_cache(model, ids.shape[1] + gen_len)
    token = compiled.prefill(model, ids, cache)
    sync()
    first = time.perf_counter()
    for i in range(gen_len - 1):
        token = compiled.step(model, token, cache, ids.shape[1] + i)
    return first


def spread(values: list[float]) -> dict:
    """Median, min and max of per-round figures, with the rounds themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": [round(v, 6) for v in values]}


@dataclass
class SpeedResult:
    rounds: list[Timing] = field(default_factory=list)          # batch 1
    batch_rounds: list[Timing] = field(default_factory=list)    # --batch N (empty when off)
    memory_bandwidth_gb_s: float | None = None                  # the machine's, measured in the same run
    compile_s: float | None = None                              # compiling the decode step, with --compile

    def figures(self) -> dict[str, list[float]]:
        """Per-round values of every timing metric."""
        out = {"ttft_s": [t.ttft_s for t in self.rounds],
               "prefill_tok_s": [t.prefill_tok_s for t in self.rounds],
               "decode_tok_s": [t.decode_tok_s for t in self.rounds]}
        if self.batch_rounds:
            out["batch_decode_tok_s"] = [t.decode_tok_s for t in self.batch_rounds]
        return out


def measure_speed(models: list, prompts: list[torch.Tensor], gen_len: int, repeats: int, warmup: int,
                  batch_prompts: list[torch.Tensor] | None = None, progress: Progress = SILENT,
                  names: list[str] | None = None, compile: bool = False) -> list[SpeedResult]:
    """Time every model in interleaved rounds: warm-up rounds (discarded), then `repeats` rounds, each
    running every model once, the order alternating (A, B, B, A, A, B, ...) so that neither model always
    runs first or after the other. `prompts[i]` is model i's [1, prompt_len] prompt. `compile`: PyTorch
    models decode through `llmopt.compiled`, compiled (and the time it took recorded) before any round."""
    names = names or [f"model {i}" for i in range(len(models))]
    results = [SpeedResult() for _ in models]
    compiled_ = [compile and isinstance(m, torch.nn.Module) for m in models]
    for i, model in enumerate(models):
        if compiled_[i]:
            progress.start(f"compiling {names[i]}'s decode step", total=None)
            results[i].compile_s = _compile(model, prompts[i], gen_len, batch_prompts[i] if batch_prompts else None)
            progress.finish()
    total = (warmup + repeats) * len(models)
    progress.start(f"speed: {warmup} warm-up + {repeats} interleaved round(s) x {len(models)} model(s)", total)
    gc.collect()
    gc.freeze()        # later collections skip the models and libraries: they take microseconds, not seconds
    try:
        for r in range(warmup + repeats):
            order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
            for i in order:
                model = models[i]
                gc.collect()
                gc.disable()          # no collector pauses inside a timed run
                try:
                    t = time_generation(model, prompts[i], gen_len, compiled_[i])
                    tb = time_generation(model, batch_prompts[i], gen_len, compiled_[i]) if batch_prompts else None
                finally:
                    gc.enable()
                if r >= warmup:
                    results[i].rounds.append(t)
                    if tb is not None:
                        results[i].batch_rounds.append(tb)
                progress.advance(1, round=f"{'warm-up' if r < warmup else r - warmup + 1}", model=names[i],
                                 decode_tok_s=round(t.decode_tok_s, 2))
    finally:
        gc.unfreeze()
    progress.finish()
    return results


def _compile(model, prompt: torch.Tensor, gen_len: int, batch_prompt: torch.Tensor | None) -> float:
    """Seconds to compile the decode step (each batch size is a graph of its own)."""
    serve_attention(model)
    device = model_device(model)
    seconds = compiled.warm_up(model, prompt.to(device), gen_len)
    if batch_prompt is not None:
        seconds += compiled.warm_up(model, batch_prompt.to(device), gen_len)
    return seconds


def bytes_read_per_token(model) -> int:
    """Weight bytes a decode step reads: all weights, except that an input embedding table not shared
    with the output head contributes one row, not the whole table (the head reads all of its own)."""
    total = weight_bytes(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    w = getattr(emb, "weight", None)
    if w is not None and (head is None or getattr(head, "weight", None) is not w):
        total -= w.numel() * w.element_size() - w.shape[-1] * w.element_size()
    return total


# --------------------------------------------------------------------------- memory (child process)

def _rss_figures() -> dict[str, int]:
    """Current and peak resident set size of this process, from /proc (Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _memory_child(spec: str, device: str, dtype: str, prompt: list[list[int]], gen_len: int, threads: int,
                  head: str, runtime: str, replies) -> None:
    try:
        torch.set_num_threads(threads)
        from transformers.utils import logging as hf_logging

        from llmopt.models import load_model

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        if runtime == "llama.cpp":
            import llama_cpp  # noqa: F401 - part of the runtime, not of the model

            from llmopt.bench.llamacpp import load_llamacpp
        before = _rss_figures().get("VmRSS")
        loaded = load_llamacpp(spec, len(prompt[0]) + gen_len, tokenizer=False) if runtime == "llama.cpp" else \
            load_model(spec, device=device, dtype=dtype, tokenizer=False, head=head)
        dev = model_device(loaded.model)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        time_generation(loaded.model, torch.tensor(prompt, dtype=torch.long), gen_len)
        result: dict[str, Any] = {"runtime_rss_bytes": before, "peak_rss_bytes": _rss_figures().get("VmHWM")}
        if dev.type == "cuda":
            result["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        replies.put(("ok", result))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        replies.put(("error", f"{type(e).__name__}: {e}"))


def peak_memory(spec: str, device: str, dtype: str, prompt: torch.Tensor, gen_len: int,
                head: str = "full", runtime: str = "transformers") -> dict[str, Any]:
    """Load `spec` in a fresh spawned process, generate once, and return its peak memory figures:
    `peak_rss_bytes` (whole process, CPU), `runtime_rss_bytes` (the process before loading the model:
    Python, torch and transformers, and llama.cpp for a GGUF file it runs: `runtime` "llama.cpp"), and on
    CUDA `peak_cuda_allocated_bytes`."""
    ctx = multiprocessing.get_context("spawn")
    replies = ctx.Queue()
    proc = ctx.Process(target=_memory_child, daemon=True,
                       args=(spec, device, dtype, prompt.tolist(), gen_len, torch.get_num_threads(), head, runtime,
                             replies))
    proc.start()
    try:
        while True:
            try:
                status, payload = replies.get(timeout=1.0)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"memory measurement of {spec}: the child process died "
                                       f"(exit code {proc.exitcode}; out of memory?)") from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {spec} failed in its child process: {payload}")
    return payload
