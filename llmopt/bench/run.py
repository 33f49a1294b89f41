"""`llmopt bench`: size, memory, speed and quality of models side by side, with deltas vs a baseline.

Everything is measured in one process on the same data: the same evaluation windows and the same
prompt tokens for every model that shares the baseline's tokenizer, fixed seeds, interleaved timing
rounds. The report is a JSON-able dict with a `schema_version`; docs/bench.md documents every field.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmopt.bench.llamacpp import LlamaCppLM, gguf_facts, load_llamacpp, resolve_gguf_runtime
from llmopt.bench.llamacpp_timer import ApartTimer
from llmopt.bench.quality import WindowStats, compare_models
from llmopt.bench.report import check_replaceable, write_csv, write_plot
from llmopt.bench.speed import bytes_read_per_token, measure_speed, memory_bandwidth, peak_memory, spread
from llmopt.checkpoint import dir_size, versions
from llmopt.data import Corpus, bos_id, check_source, cut_eval, load_text, random_windows, resolve_auto, \
    tokenize_corpus
from llmopt.errors import MissingExtra, UserError, require
from llmopt.info import model_info, original_dtype, size_ratios, stored_dtype
from llmopt.models import FORMAT_LOADERS, LoadedModel, check_head, load_model, model_device, parse_device, \
    parse_dtype, resolve
from llmopt.progress import SILENT, Progress

SCHEMA_VERSION = 1

# metric -> True when higher is better (deltas vs the baseline are reported for these)
DIRECTIONS: dict[str, bool] = {
    "parameters": False, "weight_bytes": False, "disk_bytes": False, "perplexity": False, "bits_per_byte": False,
    "ttft_s": False, "prefill_tok_s": True, "decode_tok_s": True, "batch_decode_tok_s": True,
    "peak_rss_bytes": False, "peak_cuda_allocated_bytes": False,
}
PER_TOKEN = ("perplexity", "nll")      # meaningful between models with the same tokenizer only
TIMED = ("ttft_s", "prefill_tok_s", "decode_tok_s", "batch_decode_tok_s")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")

METHOD_TEXT = {
    "perplexity": "exp(mean next-token NLL); the split's rows joined with \"\\n\\n\", tokenized once, cut into "
                  "non-overlapping windows of seq_len tokens, each scored on its own (GPTQ-paper convention); when "
                  "the model's tokenizer puts a BOS first by itself (bos_per_window), each window is that BOS and "
                  "seq_len - 1 text tokens, and the prediction from the BOS alone is not scored; per token, so "
                  "compared only between models with the baseline's tokenizer",
    "bits_per_byte": "summed next-token NLL of the scored tokens / ln 2 / UTF-8 bytes of the text those tokens "
                     "cover (as lm-evaluation-harness reports for WikiText): independent of the tokenizer, so "
                     "compared between any models",
    "size": "size_vs_float32_x = weight_bytes / (4 x the baseline's parameters); size_vs_original_dtype_x = "
            "weight_bytes / (the baseline's parameters x bytes per value of size_reference.original_dtype, the "
            "dtype the baseline's original checkpoint stores, followed back through llmopt.json); weight_bytes "
            "hold unquantized tensors at the loaded dtype (method.dtype)",
    "kl_vs_baseline": "mean over scored positions of KL(P_baseline || P_model) of the next-token distributions, "
                      "in nats, on the baseline's windows (models with the baseline's tokenizer only)",
    "top1_agreement_pct": "percent of scored positions where the model's most likely next token is the "
                          "baseline's",
    "timing": "greedy decode loop with a KV cache: one prefill forward over the prompt (last-position logits "
              "only), then one forward per new token with past_key_values; exactly gen_len tokens, no early "
              "stop; CUDA synchronized before every time stamp",
    "rounds": "warm-up rounds discarded, then `repeats` rounds each running every model once, the order "
              "alternating from round to round (A, B, B, A, A, B, ...); figures are the median and min..max "
              "over rounds; a ratio to the baseline is computed round by round, then its median (and "
              "min..max) is reported",
    "prompt": "prompt_len tokens of the quality text at a seeded offset (the same ids for every model with "
              "the baseline's tokenizer); with --batch N, N such windows",
    "ttft_s": "time of the prefill forward plus the first argmax (time to first token)",
    "prefill_tok_s": "batch x prompt_len / ttft_s",
    "decode_tok_s": "(gen_len - 1) / time from the first token to the last, batch 1",
    "compile": "--compile: every PyTorch model's decode steps run through torch.compile (inductor) over a static "
               "KV cache of prompt_len + gen_len tokens, the prefill eagerly; compile_s = wall time of a first, "
               "untimed prefill and up to three decode steps (one eager, whose small calls choose their thread "
               "count; then compiled: almost all of the time), before the warm-up rounds",
    "batch_decode_tok_s": "batch x (gen_len - 1) / decode time, at --batch N",
    "weight_bandwidth_pct": "weight_bandwidth_gb_s as a percentage of memory_bandwidth_gb_s, the machine's "
                            "copy bandwidth (bytes read + written by one 256 MiB tensor copy, best of 5) "
                            "measured once in the same run: how close decode runs to the memory limit",
    "weight_bandwidth_gb_s": "bytes of weights read per decode step x decode_tok_s / 1e9 (as gpt-fast reports); "
                             "an input embedding not tied to the head counts one row",
    "memory": "each model loaded again in a fresh spawned process that generates once with the same prompt "
              "and gen_len at batch 1; peak_rss_bytes = VmHWM of /proc/self/status at the end (the whole "
              "process, runtime included; runtime_rss_bytes is the process before loading the model); on "
              "CUDA peak_cuda_allocated_bytes = torch.cuda.max_memory_allocated after reset before generating",
    "llama.cpp": "a .gguf model with runtime llama.cpp is run by llama.cpp (llama-cpp-python) on the CPU with "
                 "llama_cpp.threads threads (torch's count), its default batch of 512 tokens, its own KV cache and "
                 "weights memory-mapped from the file (counted in peak_rss_bytes once read); it is fed the token "
                 "ids the other models get (tokenizer: the Hugging Face one transformers reads from the file) and "
                 "its logits are scored by the same code; a prefill computes the last position's logits only; "
                 "weight_bytes = the bytes of the file's tensors (disk_bytes: the whole file), parameters = "
                 "their elements; its generations are timed in a process of its own started without "
                 "OMP_WAIT_POLICY (torch and llama.cpp share one OpenMP runtime per process, and the passive "
                 "waiting llmopt sets for torch slows llama.cpp's multi-threaded decode several times), in the "
                 "same interleaved rounds",
}


@dataclass
class BenchOptions:
    models: list[str]
    baseline: str | None = None       # None: the first model is the baseline
    ppl_data: str = "auto"            # auto = wikitext2 when a data dir is set, else builtin
    data_dir: str | None = None
    seq_len: int = 2048
    ppl_windows: int = 32             # 0 = every window of the text
    prompt_len: int = 512
    gen_len: int = 128
    batch: int = 0                    # 0 = no batched throughput run; N >= 2 adds one
    repeats: int = 5
    warmup: int = 1
    skip_quality: bool = False
    skip_speed: bool = False
    memory: bool = True               # peak memory in a fresh child process per model
    device: str = "auto"
    dtype: str = "auto"
    head: str = "auto"                # a quantized checkpoint's full-precision head: models.check_head
    gguf_runtime: str = "auto"        # who runs a .gguf model: llamacpp.GGUF_RUNTIMES
    compile: bool = False             # decode steps through torch.compile (llmopt.compiled)
    seed: int = 0
    csv: str | None = None
    plot: str | None = None
    force: bool = False               # replace --csv / --plot files that bench wrote (report.FORCE_RULE)

    def validate(self) -> None:
        """Everything that can be checked without loading a model."""
        require(bool(self.models), "no model given", "pass one or more MODEL arguments")
        require(self.repeats >= 1, f"--repeats must be at least 1, got {self.repeats}",
                "timing needs at least one measured round (default 5)")
        require(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        require(self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}")
        require(self.ppl_windows >= 0, f"--ppl-windows must be >= 0 (0 = all), got {self.ppl_windows}")
        require(self.prompt_len >= 1, f"--prompt-len must be positive, got {self.prompt_len}")
        require(self.gen_len >= 2, f"--gen-len must be at least 2, got {self.gen_len}",
                "decode speed is measured on the tokens after the first")
        require(self.batch >= 0 and self.batch != 1, f"--batch must be 0 (off) or at least 2, got {self.batch}")
        require(not (self.skip_quality and self.skip_speed), "--skip-quality and --skip-speed leave nothing to do",
                "drop one of them")
        require(not (self.plot and self.skip_quality), "--plot draws perplexity, which --skip-quality skips",
                "drop --skip-quality or --plot")
        parse_dtype(self.dtype, parse_device(self.device))
        check_head(self.head)
        runtime = resolve_gguf_runtime(self.gguf_runtime, parse_device(self.device))
        check_source(self.ppl_data, "--ppl-data", "eval", self.data_dir)
        specs = ([self.baseline] if self.baseline else []) + list(self.models)
        gguf = [s for s in specs if resolve(s).kind == "gguf"]
        require(not (gguf and runtime == "llama.cpp" and self.batch and not self.skip_speed),
                f"--batch is not measured through llama.cpp, which runs {gguf[0] if gguf else ''}",
                "drop --batch, or pass --gguf-runtime transformers")
        for flag, kind, value in (("--csv", "csv", self.csv), ("--plot", "plot", self.plot)):
            if value:
                check_replaceable(value, kind, self.force, flag)
        require(not (self.csv and self.plot and Path(self.csv).expanduser().resolve()
                     == Path(self.plot).expanduser().resolve()), "--csv and --plot name the same file",
                "give them different paths")
        if self.plot:
            require(Path(self.plot).suffix.lower() in PLOT_SUFFIXES,
                    f"--plot {self.plot}: the file name must end in {', '.join(PLOT_SUFFIXES)}")
            if importlib.util.find_spec("matplotlib") is None:
                raise MissingExtra("matplotlib", "plot", "--plot")


@dataclass
class _Entry:
    name: str
    role: str              # "baseline" | "model"
    loaded: LoadedModel


def _key(spec: str) -> str:
    """Two specs naming the same model load it once."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec.strip().lower()


def _load(spec: str, opts: BenchOptions, progress: Progress, gguf_runtime: str) -> LoadedModel:
    try:
        if gguf_runtime == "llama.cpp" and resolve(spec).kind == "gguf":
            progress.start(f"Loading {spec} (GGUF, llama.cpp)", total=None)
            loaded = load_llamacpp(spec, max(opts.seq_len, opts.prompt_len + opts.gen_len))
            progress.finish()
            return loaded
        return load_model(spec, device=opts.device, dtype=opts.dtype, progress=progress, head=opts.head)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken checkpoint is the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"model {spec} failed to load: {type(e).__name__}: {first}"[:400],
                        hint="check that it is a complete checkpoint (llmopt info MODEL)") from e


def _disk_bytes(loaded: LoadedModel) -> int | None:
    path = loaded.source.path
    return dir_size(path) if path is not None and Path(path).exists() else None


def _entries(opts: BenchOptions, progress: Progress, gguf_runtime: str) -> list[_Entry]:
    """The baseline first, then the models; a model named twice is loaded once."""
    specs = [(opts.baseline, "baseline")] + [(m, "model") for m in opts.models] if opts.baseline else \
        [(opts.models[0], "baseline")] + [(m, "model") for m in opts.models[1:]]
    cache: dict[str, LoadedModel] = {}
    entries = []
    for spec, role in specs:
        key = _key(spec)
        if key not in cache:
            cache[key] = _load(spec, opts, progress, gguf_runtime)
        entries.append(_Entry(spec, role, cache[key]))
    return entries


def same_tokenizer(a, b, ids_a: torch.Tensor, ids_b: torch.Tensor) -> bool:
    """Same vocabulary (token -> id), same BOS convention and the same ids for the evaluation text."""
    return a is b or (a.get_vocab() == b.get_vocab() and bos_id(a) == bos_id(b) and torch.equal(ids_a, ids_b))


def _tokenize(entries: list[_Entry], text: str, progress: Progress) -> tuple[list[Corpus], list[bool]]:
    """Each tokenizer's corpus, once per loaded model, and whether it is the baseline's tokenizer."""
    done: dict[int, Corpus] = {}
    for e in entries:
        if id(e.loaded) not in done:
            done[id(e.loaded)] = tokenize_corpus(e.loaded.tokenizer, text)
    corpora = [done[id(e.loaded)] for e in entries]
    base = entries[0].loaded.tokenizer
    same = [same_tokenizer(base, e.loaded.tokenizer, corpora[0].ids, c.ids) for e, c in zip(entries, corpora)]
    for e, s in zip(entries, same):
        if not s:
            progress.note(f"{e.name} has another tokenizer than the baseline: its perplexity is per token of "
                          "another vocabulary, so only bits per byte is compared (no perplexity delta, KL or "
                          "agreement), and it gets its own prompt tokens")
    return corpora, same


def _facts(entries: list[_Entry]) -> dict[int, dict]:
    facts = {}
    for e in entries:
        if id(e.loaded) in facts:
            continue
        if isinstance(e.loaded.model, LlamaCppLM):
            info = gguf_facts(e.loaded.model.path)
        else:
            info = model_info(e.loaded.model, None)
            info["stored_dtype"] = stored_dtype(e.loaded.path)
            info["bytes_read_per_token"] = bytes_read_per_token(e.loaded.model)
        info["disk_bytes"] = _disk_bytes(e.loaded)
        info["runtime"] = runtime_of(e.loaded.model, info["quantization"])
        facts[id(e.loaded)] = info
    return facts


def runtime_of(model, quantization: dict | None) -> str:
    """Who runs a model: llama.cpp, llmopt's own runtime (its quantized formats) or transformers."""
    if isinstance(model, LlamaCppLM):
        return model.runtime
    return "llmopt" if (quantization or {}).get("quant_method") in FORMAT_LOADERS else "transformers"


def _speed(opts: BenchOptions, entries: list[_Entry], corpora: list[Corpus], progress: Progress,
           facts: dict[int, dict]) -> tuple:
    """Timing rounds over all models and, when asked, peak memory in a fresh process per model."""
    prompts = [random_windows(c.ids, 1, opts.prompt_len, opts.seed) for c in corpora]
    batch_prompts = [random_windows(c.ids, opts.batch, opts.prompt_len, opts.seed) for c in corpora] \
        if opts.batch else None
    memory = None
    if opts.memory:
        memory = []
        done: dict[int, dict] = {}
        for e, prompt in zip(entries, prompts):
            if id(e.loaded) not in done:
                progress.start(f"memory: {e.name} (fresh process)", total=None)
                done[id(e.loaded)] = peak_memory(e.name, opts.device, opts.dtype, prompt, opts.gen_len, opts.head,
                                                 facts[id(e.loaded)]["runtime"])
                progress.finish()
            memory.append(done[id(e.loaded)])
    bandwidth = memory_bandwidth(model_device(entries[0].loaded.model))
    with _timed_apart(entries, max(opts.seq_len, opts.prompt_len + opts.gen_len)):
        speed = measure_speed([e.loaded.model for e in entries], prompts, opts.gen_len, opts.repeats, opts.warmup,
                              batch_prompts, progress, names=[e.name for e in entries], compile=opts.compile)
    for s in speed:
        s.memory_bandwidth_gb_s = bandwidth
    return speed, memory


@contextlib.contextmanager
def _timed_apart(entries: list[_Entry], context: int) -> Iterator[None]:
    """While the block runs, every model llama.cpp runs has a timer in a process of its own
    (`llamacpp_timer`: OpenMP waits there as it does when llama.cpp runs alone)."""
    models = {id(e.loaded.model): e.loaded.model for e in entries if isinstance(e.loaded.model, LlamaCppLM)}
    started: list[LlamaCppLM] = []
    try:
        for model in models.values():
            model.time_apart = ApartTimer(model.path, context, model.threads)
            started.append(model)
        yield
    finally:
        for model in started:
            model.time_apart.close()
            model.time_apart = None


def bench(opts: BenchOptions, progress: Progress = SILENT) -> dict:
    """Measure every model and the baseline; return the report (see docs/bench.md for the schema)."""
    opts.validate()
    started = time.time()
    device = parse_device(opts.device)
    source = resolve_auto(opts.ppl_data, opts.data_dir)
    text = load_text(source, "eval", opts.data_dir)          # a bad data source fails before any loading
    gguf_runtime = resolve_gguf_runtime(opts.gguf_runtime, device)
    entries = _entries(opts, progress, gguf_runtime)
    corpora, same = _tokenize(entries, text.text, progress)
    bos = [bos_id(e.loaded.tokenizer) for e in entries]
    if not opts.skip_speed:
        shortest = min(c.ids.numel() for c in corpora)
        require(shortest > opts.prompt_len, f"the prompt text has {shortest} tokens, not more than "
                f"--prompt-len {opts.prompt_len}", "use a longer --ppl-data text or a smaller --prompt-len")
    windows = None
    if not opts.skip_quality:
        windows = [cut_eval(c, opts.seq_len, opts.ppl_windows or None, b) for c, b in zip(corpora, bos)]
    facts = _facts(entries)
    quality = compare_models([e.loaded.model for e in entries], windows, 0, progress, same) \
        if windows is not None else None
    speed, memory = _speed(opts, entries, corpora, progress, facts) if not opts.skip_speed else (None, None)

    base_info = facts[id(entries[0].loaded)]
    reference = {"parameters": base_info["parameters"], "original_dtype": original_dtype(entries[0].loaded.path)}
    rows = [_row(i, entries, facts[id(e.loaded)], reference, quality[i] if quality else None,
                 speed[i] if speed else None, memory[i] if memory else None)
            for i, e in enumerate(entries)]
    for i, row in enumerate(rows):
        row["same_tokenizer_as_baseline"] = same[i]
        row["bos_per_window"] = bos[i] is not None
    for i in range(1, len(rows)):
        rows[i]["deltas"] = _deltas(rows[0], rows[i], speed[0] if speed else None, speed[i] if speed else None,
                                    same[i])

    report = {
        "schema_version": SCHEMA_VERSION,
        "command": "bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.time() - started, 3),
        "versions": versions(),
        "baseline": rows[0]["name"],
        "method": _method(opts, device, source, text.description, speed is not None, gguf_runtime, entries),
        "models": rows,
    }
    report["method"]["size_reference"] = reference
    report["method"]["memory_bandwidth_gb_s"] = speed[0].memory_bandwidth_gb_s if speed else None
    if opts.csv:
        write_csv(report, opts.csv, opts.force)
    if opts.plot:
        write_plot(report, opts.plot, opts.force)
    return report


def _row(i: int, entries: list[_Entry], info: dict, reference: dict, q: WindowStats | None, sp, mem) -> dict:
    """One model's row: what it is, its metrics, and its timings (deltas are added after)."""
    e = entries[i]
    metrics: dict[str, Any] = {k: info[k] for k in ("parameters", "weight_bytes", "disk_bytes",
                                                    "bits_per_weight", "bytes_read_per_token")}
    metrics.update(_sizes(info["weight_bytes"], reference))
    metrics.update(dict.fromkeys(("perplexity", "nll", "bits_per_byte", "ppl_windows", "ppl_tokens", "ppl_bytes",
                                  "kl_vs_baseline", "top1_agreement_pct", "ttft_s", "prefill_tok_s",
                                  "decode_tok_s", "batch_decode_tok_s", "weight_bandwidth_gb_s", "weight_bandwidth_pct",
                                  "compile_s",
                                  "peak_rss_bytes",
                                  "runtime_rss_bytes", "peak_cuda_allocated_bytes")))
    timings: dict[str, dict] = {}
    if q is not None:
        metrics.update(perplexity=q.perplexity, nll=q.nll, bits_per_byte=q.bits_per_byte,
                       ppl_windows=len(q.window_nll), ppl_tokens=q.tokens, ppl_bytes=q.bytes, kl_vs_baseline=q.kl,
                       top1_agreement_pct=None if q.top1_agreement is None else 100.0 * q.top1_agreement)
    if sp is not None:
        for name, values in sp.figures().items():
            timings[name] = spread(values)
            metrics[name] = timings[name]["median"]
        metrics["weight_bandwidth_gb_s"] = info["bytes_read_per_token"] * metrics["decode_tok_s"] / 1e9
        metrics["weight_bandwidth_pct"] = 100.0 * metrics["weight_bandwidth_gb_s"] / sp.memory_bandwidth_gb_s
        metrics["compile_s"] = sp.compile_s
    if mem is not None:
        metrics.update({k: mem.get(k) for k in ("peak_rss_bytes", "runtime_rss_bytes", "peak_cuda_allocated_bytes")})
    return {
        "name": e.name, "role": e.role,
        "path": str(e.loaded.source.path) if e.loaded.source.path else None,
        "same_model_as": next((entries[j].name for j in range(i) if entries[j].loaded is e.loaded), None),
        "architecture": info["architecture"], "model_type": info["model_type"], "dtype": info["dtype"],
        "stored_dtype": info["stored_dtype"], "quantization": info["quantization"], "runtime": info["runtime"],
        "runtime_head": getattr(e.loaded.model, "runtime_head", None),
        "metrics": metrics, "timings": timings, "deltas": {},
    }


def _sizes(weight_bytes: int, reference: dict) -> dict:
    """Weight bytes against the baseline's parameters in float32 and in the original's stored dtype."""
    r = size_ratios(weight_bytes, reference["parameters"], reference["original_dtype"])
    return {k: r[k] for k in ("size_vs_float32_x", "size_vs_original_dtype_x")}


def _deltas(base: dict, row: dict, base_speed, speed, same_tokenizer: bool = True) -> dict:
    """x = model / baseline (timed metrics: median of the per-round ratios, with their min..max). Per-token
    figures are not compared across tokenizers: bits per byte is."""
    out = {}
    for name, higher_better in DIRECTIONS.items():
        if name in PER_TOKEN and not same_tokenizer:
            continue
        b, v = base["metrics"].get(name), row["metrics"].get(name)
        if b is None or v is None or b == 0:
            continue
        d: dict[str, Any] = {"x": v / b}
        if name in TIMED and speed is not None:
            ratios = [m / r for m, r in zip(speed.figures()[name], base_speed.figures()[name])]
            s = spread(ratios)
            d = {"x": s["median"], "min_x": s["min"], "max_x": s["max"], "rounds_x": s["rounds"],
                 "within_noise": s["min"] <= 1.0 <= s["max"]}
        d["pct"] = 100.0 * (d["x"] - 1.0)
        d["better"] = d["x"] > 1.0 if higher_better else d["x"] < 1.0
        out[name] = d
    return out


def _method(opts: BenchOptions, device: torch.device, source: str, description: str, timed: bool,
            gguf_runtime: str, entries: list[_Entry]) -> dict:
    settings = asdict(opts)
    for k in ("models", "baseline", "csv", "plot", "force"):
        settings.pop(k)
    return {
        "settings": settings,
        "device": str(device),
        "dtype": str(parse_dtype(opts.dtype, device)).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "ppl_data": source,
        "ppl_data_description": description,
        "quality": None if opts.skip_quality else {
            k: METHOD_TEXT[k] for k in ("perplexity", "bits_per_byte", "kl_vs_baseline", "top1_agreement_pct")},
        "size": METHOD_TEXT["size"],
        "speed": None if not timed else {
            k: METHOD_TEXT[k] for k in ("timing", "rounds", "prompt", "ttft_s", "prefill_tok_s", "decode_tok_s",
                                        "batch_decode_tok_s", "weight_bandwidth_gb_s", "weight_bandwidth_pct")
            } | ({"compile": METHOD_TEXT["compile"]} if opts.compile else {}),
        "memory": METHOD_TEXT["memory"] if timed and opts.memory else None,
        "gguf_runtime": gguf_runtime,
        "llama_cpp": _llama_cpp(entries),
    }


def _llama_cpp(entries: list[_Entry]) -> dict | None:
    """How llama.cpp ran, when it ran a model: its version, threads and the method text."""
    runs = [e.loaded.model for e in entries if isinstance(e.loaded.model, LlamaCppLM)]
    if not runs:
        return None
    import llama_cpp

    return {"version": llama_cpp.__version__, "threads": runs[0].threads, "method": METHOD_TEXT["llama.cpp"]}
