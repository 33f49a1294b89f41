"""`llmopt bench`: size, memory, speed and quality of models side by side, with deltas vs a baseline.

Everything is measured in one process on the same data: the same evaluation windows and the same
prompt tokens for every model that shares the baseline's tokenizer, fixed seeds, interleaved timing
rounds. The report is a JSON-able dict with a `schema_version`; docs/bench.md documents every field.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmopt.bench.quality import compare_models
from llmopt.bench.report import write_csv, write_plot
from llmopt.bench.speed import bytes_read_per_token, measure_speed, peak_memory, spread
from llmopt.checkpoint import dir_size, versions
from llmopt.data import NAMED_SOURCES, eval_windows, load_text, random_windows, resolve_auto, tokenize
from llmopt.errors import MissingExtra, UserError, require
from llmopt.info import model_info
from llmopt.models import LoadedModel, load_model, parse_device, parse_dtype, resolve
from llmopt.progress import SILENT, Progress

SCHEMA_VERSION = 1

# metric -> True when higher is better (deltas vs the baseline are reported for these)
DIRECTIONS: dict[str, bool] = {
    "parameters": False, "weight_bytes": False, "disk_bytes": False, "perplexity": False,
    "ttft_s": False, "prefill_tok_s": True, "decode_tok_s": True, "batch_decode_tok_s": True,
    "peak_rss_bytes": False, "peak_cuda_allocated_bytes": False,
}
TIMED = ("ttft_s", "prefill_tok_s", "decode_tok_s", "batch_decode_tok_s")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")

METHOD_TEXT = {
    "perplexity": "exp(mean next-token NLL); the split's rows joined with \"\\n\\n\", tokenized once, cut into "
                  "non-overlapping windows of seq_len tokens, each scored on its own (GPTQ-paper convention)",
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
    "batch_decode_tok_s": "batch x (gen_len - 1) / decode time, at --batch N",
    "weight_bandwidth_gb_s": "bytes of weights read per decode step x decode_tok_s / 1e9 (as gpt-fast reports); "
                             "an input embedding not tied to the head counts one row",
    "memory": "each model loaded again in a fresh spawned process that generates once with the same prompt "
              "and gen_len at batch 1; peak_rss_bytes = VmHWM of /proc/self/status at the end (the whole "
              "process, runtime included; runtime_rss_bytes is the process before loading the model); on "
              "CUDA peak_cuda_allocated_bytes = torch.cuda.max_memory_allocated after reset before generating",
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
    seed: int = 0
    csv: str | None = None
    plot: str | None = None
    force: bool = False               # overwrite --csv / --plot files

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
        source = resolve_auto(self.ppl_data, self.data_dir)
        if source.strip().lower() not in NAMED_SOURCES:
            require(Path(source).expanduser().exists(), f"--ppl-data {source} does not exist",
                    f"pass a .txt/.jsonl file, a folder with wiki.test.raw, or one of {', '.join(NAMED_SOURCES)}")
        for spec in ([self.baseline] if self.baseline else []) + list(self.models):
            resolve(spec)
        for flag, value in (("--csv", self.csv), ("--plot", self.plot)):
            if value:
                path = Path(value).expanduser()
                require(not path.is_dir(), f"{flag} {value} is a directory", "give a file name")
                require(self.force or not path.exists(), f"{flag} {value} already exists",
                        "pass --force to overwrite it")
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


def _load(spec: str, opts: BenchOptions, progress: Progress) -> LoadedModel:
    try:
        return load_model(spec, device=opts.device, dtype=opts.dtype, progress=progress)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken checkpoint is the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"model {spec} failed to load: {type(e).__name__}: {first}"[:400],
                        hint="check that it is a complete checkpoint (llmopt info MODEL)") from e


def _disk_bytes(loaded: LoadedModel) -> int | None:
    path = loaded.source.path
    return dir_size(path) if path is not None and Path(path).exists() else None


def bench(opts: BenchOptions, progress: Progress = SILENT) -> dict:
    """Measure every model and the baseline; return the report (see docs/bench.md for the schema)."""
    opts.validate()
    started = time.time()
    device = parse_device(opts.device)
    source = resolve_auto(opts.ppl_data, opts.data_dir)
    text = load_text(source, "eval", opts.data_dir)          # a bad data source fails before any loading

    specs = [(opts.baseline, "baseline")] + [(m, "model") for m in opts.models] if opts.baseline else \
        [(opts.models[0], "baseline")] + [(m, "model") for m in opts.models[1:]]
    cache: dict[str, LoadedModel] = {}
    entries = []
    for spec, role in specs:
        key = _key(spec)
        if key not in cache:
            cache[key] = _load(spec, opts, progress)
        entries.append(_Entry(spec, role, cache[key]))

    token_ids: dict[int, torch.Tensor] = {}
    for e in entries:
        if id(e.loaded) not in token_ids:
            token_ids[id(e.loaded)] = tokenize(e.loaded.tokenizer, text.text)
    ids = [token_ids[id(e.loaded)] for e in entries]
    base_ids = ids[0]
    for e, t in zip(entries[1:], ids[1:]):
        if not torch.equal(t, base_ids):
            progress.note(f"{e.name} tokenizes the text differently from the baseline: perplexity only, "
                          "no KL / agreement, and its own prompt tokens")

    if not opts.skip_speed:
        shortest = min(t.numel() for t in ids)
        require(shortest > opts.prompt_len, f"the prompt text has {shortest} tokens, not more than "
                f"--prompt-len {opts.prompt_len}", "use a longer --ppl-data text or a smaller --prompt-len")
    windows = None
    if not opts.skip_quality:
        windows = [eval_windows(t, opts.seq_len, opts.ppl_windows or None) for t in ids]

    models = [e.loaded.model for e in entries]
    facts = {}
    for e in entries:
        if id(e.loaded) not in facts:
            info = model_info(e.loaded.model, None)
            info["disk_bytes"] = _disk_bytes(e.loaded)
            info["bytes_read_per_token"] = bytes_read_per_token(e.loaded.model)
            facts[id(e.loaded)] = info

    quality = compare_models(models, windows, 0, progress) if windows is not None else None

    speed = memory = None
    if not opts.skip_speed:
        prompts = [random_windows(t, 1, opts.prompt_len, opts.seed) for t in ids]
        batch_prompts = [random_windows(t, opts.batch, opts.prompt_len, opts.seed) for t in ids] \
            if opts.batch else None
        if opts.memory:
            memory = []
            done: dict[int, dict] = {}
            for e, prompt in zip(entries, prompts):
                if id(e.loaded) not in done:
                    progress.start(f"memory: {e.name} (fresh process)", total=None)
                    done[id(e.loaded)] = peak_memory(e.name, opts.device, opts.dtype, prompt, opts.gen_len)
                    progress.finish()
                memory.append(done[id(e.loaded)])
        speed = measure_speed(models, prompts, opts.gen_len, opts.repeats, opts.warmup, batch_prompts, progress,
                              names=[e.name for e in entries])

    rows = []
    for i, e in enumerate(entries):
        info = facts[id(e.loaded)]
        metrics: dict[str, Any] = {k: info[k] for k in ("parameters", "weight_bytes", "disk_bytes",
                                                        "bits_per_weight", "bytes_read_per_token")}
        metrics.update(dict.fromkeys(("perplexity", "nll", "ppl_windows", "ppl_tokens", "kl_vs_baseline",
                                      "top1_agreement_pct", "ttft_s", "prefill_tok_s", "decode_tok_s",
                                      "batch_decode_tok_s", "weight_bandwidth_gb_s", "peak_rss_bytes",
                                      "runtime_rss_bytes", "peak_cuda_allocated_bytes")))
        timings: dict[str, dict] = {}
        if quality is not None:
            q = quality[i]
            metrics.update(perplexity=q.perplexity, nll=q.nll, ppl_windows=len(q.window_nll), ppl_tokens=q.tokens,
                           kl_vs_baseline=q.kl,
                           top1_agreement_pct=None if q.top1_agreement is None else 100.0 * q.top1_agreement)
        if speed is not None:
            for name, values in speed[i].figures().items():
                timings[name] = spread(values)
                metrics[name] = timings[name]["median"]
            metrics["weight_bandwidth_gb_s"] = info["bytes_read_per_token"] * metrics["decode_tok_s"] / 1e9
        if memory is not None:
            metrics.update({k: memory[i].get(k) for k in ("peak_rss_bytes", "runtime_rss_bytes",
                                                          "peak_cuda_allocated_bytes")})
        rows.append({
            "name": e.name, "role": e.role,
            "path": str(e.loaded.source.path) if e.loaded.source.path else None,
            "same_model_as": next((entries[j].name for j in range(i) if entries[j].loaded is e.loaded), None),
            "architecture": info["architecture"], "model_type": info["model_type"], "dtype": info["dtype"],
            "quantization": info["quantization"],
            "metrics": metrics, "timings": timings, "deltas": {},
        })
    for i in range(1, len(rows)):
        rows[i]["deltas"] = _deltas(rows[0], rows[i], speed[0] if speed else None, speed[i] if speed else None)

    report = {
        "schema_version": SCHEMA_VERSION,
        "command": "bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.time() - started, 3),
        "versions": versions(),
        "baseline": rows[0]["name"],
        "method": _method(opts, device, source, text.description, speed is not None),
        "models": rows,
    }
    if opts.csv:
        write_csv(report, opts.csv)
    if opts.plot:
        write_plot(report, opts.plot)
    return report


def _deltas(base: dict, row: dict, base_speed, speed) -> dict:
    """x = model / baseline (timed metrics: median of the per-round ratios, with their min..max)."""
    out = {}
    for name, higher_better in DIRECTIONS.items():
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


def _method(opts: BenchOptions, device: torch.device, source: str, description: str, timed: bool) -> dict:
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
            k: METHOD_TEXT[k] for k in ("perplexity", "kl_vs_baseline", "top1_agreement_pct")},
        "speed": None if not timed else {
            k: METHOD_TEXT[k] for k in ("timing", "rounds", "prompt", "ttft_s", "prefill_tok_s", "decode_tok_s",
                                        "batch_decode_tok_s", "weight_bandwidth_gb_s")},
        "memory": METHOD_TEXT["memory"] if timed and opts.memory else None,
    }
