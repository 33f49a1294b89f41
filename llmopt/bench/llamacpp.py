"""A GGUF file run by llama.cpp (through llama-cpp-python) inside `llmopt bench`, beside torch models.

`LlamaCppLM` answers the two calls bench makes of a causal LM, so timing (`speed.time_generation`)
and scoring (`quality.compare_models`) run the same code, on the same token ids, for both runtimes:

- `model(input_ids=..., past_key_values=None, logits_to_keep=1)` starts over: llama.cpp's own KV
  cache is cleared and the prompt evaluated; only the last position's logits are computed;
- `model(input_ids=<one token>, past_key_values=<the state the previous call returned>)` continues
  from llama.cpp's KV cache;
- `model(ids)` (no cache) evaluates a whole window with the logits of every position.

The KV cache is llama.cpp's: the "cache" bench passes along is only a receipt (`LlamaCppState`) saying
which decode it continues, so a stale one is refused instead of silently continuing another sequence.
Facts for the report (parameters, weight bytes) are read from the file's tensor table by gguf's reader.
`llama_cpp` is an optional dependency (`pip install 'llmopt[llamacpp]'`), imported only when used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmopt.errors import MissingExtra, UserError

GGUF_RUNTIMES = ("auto", "llama.cpp", "transformers")
GGUF_RUNTIME_HELP = ("Who runs a .gguf MODEL: llama.cpp (through llama-cpp-python, on the CPU, with as many "
                     "threads as torch), transformers (dequantized to torch), or auto: llama.cpp when "
                     "llama-cpp-python is installed and the device is the CPU, else transformers.")
EXTRA = "llamacpp"
FLOAT_TYPES = ("F32", "F16", "BF16")


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_gguf_runtime(choice: str, device: torch.device) -> str:
    """`--gguf-runtime` made concrete: "llama.cpp" or "transformers"; a request that cannot be met is a
    UserError, raised before any model loads."""
    if choice not in GGUF_RUNTIMES:
        raise UserError(f"--gguf-runtime {choice!r} is not one of {', '.join(GGUF_RUNTIMES)}",
                        hint="auto, llama.cpp or transformers")
    if choice == "transformers" or (choice == "auto" and (device.type != "cpu" or not llamacpp_installed())):
        return "transformers"
    if not llamacpp_installed():
        raise MissingExtra("llama_cpp", EXTRA, "--gguf-runtime llama.cpp")
    if device.type != "cpu":
        raise UserError(f"--gguf-runtime llama.cpp runs on the CPU, but --device is {device}",
                        hint="pass --device cpu, or --gguf-runtime transformers")
    return "llama.cpp"


@dataclass(frozen=True)
class LlamaCppState:
    """Where llama.cpp's KV cache stands after a call: returned as the call's cache, passed to the next."""

    tokens: int


@dataclass
class LlamaCppOutput:
    """The part of a transformers model output bench reads: `.logits`, and the cache by keyword."""

    logits: torch.Tensor
    past_key_values: LlamaCppState

    def __contains__(self, key: str) -> bool:
        return key in ("logits", "past_key_values")

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class _InputsOnCpu:
    """What `models.model_device` reads: llama.cpp takes its token ids from the CPU."""

    weight = torch.empty(0)


class LlamaCppLM:
    """A llama.cpp model behind the forward bench calls (see the module docstring)."""

    runtime = "llama.cpp"

    def __init__(self, llm, path: Path, threads: int) -> None:
        self.llm = llm
        self.path = path
        self.threads = threads
        self.n_vocab = llm.n_vocab()
        self._state: LlamaCppState | None = None
        self.time_apart = None          # bench's timer in a process of its own (`llamacpp_timer`), while it times

    def get_input_embeddings(self) -> _InputsOnCpu:
        return _InputsOnCpu()

    def fresh_cache(self) -> dict:
        """The prefill's cache keyword: none, so llama.cpp starts over."""
        return {"past_key_values": None}

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False,
                 past_key_values: LlamaCppState | None = None, logits_to_keep: int = 0) -> LlamaCppOutput:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"llama.cpp runs one sequence at a time, got input_ids of shape {list(input_ids.shape)}")
        if past_key_values is None:
            start = 0
        elif past_key_values is self._state:
            start = past_key_values.tokens
        else:
            raise ValueError("this llama.cpp state is not the one its KV cache holds now (another call came between)")
        tokens = input_ids[0].tolist()
        logits = self._decode(tokens, start, every_position=logits_to_keep != 1)
        self._state = LlamaCppState(start + len(tokens))
        return LlamaCppOutput(torch.from_numpy(logits)[None], self._state)

    forward = __call__

    def _decode(self, tokens: list[int], start: int, every_position: bool) -> np.ndarray:
        """Evaluate `tokens` after the first `start` cached ones, in llama.cpp batches of n_batch tokens, as
        `Llama.eval` does; return the logits of every position ([T, V]) or of the last one ([1, V])."""
        ctx, batch, step = self.llm._ctx, self.llm._batch, self.llm.n_batch
        ctx.kv_cache_seq_rm(-1, start, -1)
        rows = []
        for i in range(0, len(tokens), step):
            chunk = tokens[i:i + step]
            batch.set_batch(batch=chunk, n_past=start + i, logits_all=every_position)
            ctx.decode(batch)
            if every_position or i + step >= len(tokens):
                n = len(chunk) if every_position else 1
                rows.append(np.ctypeslib.as_array(ctx.get_logits(), shape=(n * self.n_vocab,))
                            .reshape(n, self.n_vocab).copy())
        return np.concatenate(rows) if len(rows) > 1 else rows[0]


def load_llamacpp(path: str | Path, context: int, tokenizer: bool = True, threads: int | None = None):
    """Open a GGUF file in llama.cpp with room for `context` tokens and torch's thread count; the tokenizer
    is the Hugging Face one transformers reads from the file, as `models.load_model` reads it, so the
    same text gives the same ids as the torch models with that vocabulary. Returns a `LoadedModel`."""
    from llama_cpp import Llama

    from llmopt.models import LoadedModel, Source

    path = Path(path).expanduser()
    threads = threads or torch.get_num_threads()
    try:
        llm = Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                    n_gpu_layers=0, logits_all=False, verbose=False)
    except ValueError as e:
        raise UserError(f"llama.cpp could not load {path}: {e}",
                        hint="check the file with `llmopt info`, or pass --gguf-runtime transformers") from e
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = LlamaCppLM(llm, path, threads)
    return LoadedModel(model, tok, Source(str(path), "gguf", path=path), torch.device("cpu"))


def gguf_facts(path: str | Path) -> dict[str, Any]:
    """The report's facts for a GGUF file, from its tensor table: parameters (elements of every tensor),
    weight_bytes (the tensors' bytes, without metadata), and bytes_read_per_token (an embedding table
    apart from the output head counts one row, as `speed.bytes_read_per_token` counts it)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    params = sum(int(t.n_elements) for t in tensors.values())
    nbytes = sum(int(t.n_bytes) for t in tensors.values())
    by_type: dict[str, int] = {}
    for t in tensors.values():
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    main = max(by_type, key=by_type.get)
    read = nbytes
    emb = tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in tensors:
        rows = int(emb.shape[-1])             # gguf lists dimensions innermost first
        read -= int(emb.n_bytes) - int(emb.n_bytes) // rows
    arch = reader.get_field("general.architecture")
    arch = arch.contents() if arch is not None else None
    return {
        "architecture": arch, "model_type": arch, "parameters": params, "weight_bytes": nbytes,
        "bits_per_weight": round(8 * nbytes / params, 3) if params else None,
        "bytes_read_per_token": read, "dtype": main.lower(), "stored_dtype": main.lower(),
        "quantization": None if main in FLOAT_TYPES else {"quant_method": "gguf", "ggml_type": main,
                                                          "tensor_bytes_by_type": by_type},
    }
