"""Rendering a bench report: a rich table (also used by `llmopt run`), a CSV file and a plot.

All three read the JSON-able report that `llmopt.bench.run.bench` returns and compute nothing new.
Files are written through a temporary sibling and a rename, never over a file llmopt bench did not
write (`check_replaceable`).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from llmopt.errors import require

METRIC_COLUMNS = ("parameters", "weight_bytes", "disk_bytes", "bits_per_weight", "bytes_read_per_token",
                  "size_vs_float32_x", "size_vs_original_dtype_x", "perplexity", "nll", "bits_per_byte",
                  "ppl_windows", "ppl_tokens", "ppl_bytes", "kl_vs_baseline", "top1_agreement_pct",
                  "ttft_s", "prefill_tok_s", "decode_tok_s", "batch_decode_tok_s", "weight_bandwidth_gb_s",
                  "peak_rss_bytes", "runtime_rss_bytes", "peak_cuda_allocated_bytes")
DELTA_COLUMNS = ("parameters", "weight_bytes", "disk_bytes", "perplexity", "bits_per_byte", "ttft_s", "prefill_tok_s",
                 "decode_tok_s", "batch_decode_tok_s", "peak_rss_bytes", "peak_cuda_allocated_bytes")


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"


def _delta(d: dict | None, style: str = "x") -> Text:
    """The delta line under a value: green when better, red when worse, dim when within timing noise."""
    if not d:
        return Text("")
    label = f"{d['pct']:+.1f}%" if style == "pct" else f"{d['x']:.2f}x"
    if d.get("within_noise"):
        return Text(f"{label} ~", style="dim")
    if abs(d["x"] - 1.0) < 1e-12:
        return Text(label, style="dim")
    strong = abs(d["pct"]) >= 10
    color = "green" if d["better"] else "red"
    return Text(label, style=f"bold {color}" if strong else color)


def _cell(*lines: str | Text) -> Text:
    """A multi-line cell: the value, then its delta, then anything else (empty lines dropped)."""
    cell = Text()
    for line in lines:
        line = Text(line) if isinstance(line, str) else line
        if line.plain:
            if cell.plain:
                cell.append("\n")
            cell.append_text(line)
    return cell


def _range(row: dict, name: str, scale: float = 1.0) -> Text:
    t = row["timings"].get(name)
    return Text("") if not t else Text(f"{_num(t['min'] * scale)}..{_num(t['max'] * scale)}", style="dim")


SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _pct_of_memory(row: dict) -> str:
    pct = (row.get("metrics") or {}).get("weight_bandwidth_pct")
    return "" if pct is None else f"{pct:.0f}% of memory"


def _sizes(row: dict, original: str | None) -> list[Text]:
    """Weights against the baseline's parameters in float32 and in the original's dtype."""
    lines = [Text(f"{row['metrics']['size_vs_float32_x']:.2f}x fp32")] \
        if row["metrics"].get("size_vs_float32_x") is not None else []
    x = row["metrics"].get("size_vs_original_dtype_x")
    if x is not None and original != "float32":
        lines.append(Text(f"{x:.2f}x {SHORT_DTYPES.get(original, original)}"))
    return lines


def _per_token(row: dict, cell: Text) -> Text:
    """A per-token figure's delta, or why there is none: another tokenizer's tokens are other units."""
    if row["role"] != "baseline" and row.get("same_tokenizer_as_baseline") is False:
        return Text("other tokenizer", style="dim")
    return cell


def render_table(report: dict, title: str | None = None) -> Table:
    """One row per model, baseline first; under each figure its delta vs the baseline (x = model/baseline,
    perplexity and bits per byte in %), and under timed figures the min..max over the rounds."""
    rows = report["models"]
    has = {k: any(r["metrics"].get(k) is not None for r in rows) for k in METRIC_COLUMNS}
    method = report.get("method", {})
    table = Table(title=title or f"llmopt bench ({method.get('device', '?')}, {method.get('dtype', '?')})",
                  caption=Text(_caption(report)), caption_justify="left")
    m = lambda r, k: r["metrics"].get(k)  # noqa: E731
    original = method.get("size_reference", {}).get("original_dtype")
    d = lambda r, k, style="x": _delta(r["deltas"].get(k), style)  # noqa: E731
    runtimes = len({r.get("runtime") for r in rows}) > 1
    columns: list[tuple[str, Any]] = [
        ("model", lambda r: _cell(r["name"], Text("baseline" if r["role"] == "baseline" else
                                                  _quant(r.get("quantization")), style="dim"),
                                  Text(f"on {r.get('runtime')}" if runtimes else "", style="dim"))),
        ("params", lambda r: _cell(_count(m(r, "parameters")), d(r, "parameters"))),
        ("weights", lambda r: _cell(_bytes(m(r, "weight_bytes")), *_sizes(r, original),
                                    Text(f"{_num(m(r, 'bits_per_weight'))} b/w", style="dim"))),
        ("disk", lambda r: _cell(_bytes(m(r, "disk_bytes")), d(r, "disk_bytes"))),
    ]
    if has["perplexity"]:
        columns += [
            ("ppl", lambda r: _cell(_num(m(r, "perplexity"), 4), _per_token(r, d(r, "perplexity", "pct")))),
            ("bits/byte", lambda r: _cell(_num(m(r, "bits_per_byte"), 4), d(r, "bits_per_byte", "pct"))),
            ("KL", lambda r: _cell(_num(m(r, "kl_vs_baseline")))),
            ("top-1", lambda r: _cell("-" if m(r, "top1_agreement_pct") is None
                                      else f"{m(r, 'top1_agreement_pct'):.2f}%")),
        ]
    if has["decode_tok_s"]:
        columns += [
            ("TTFT ms", lambda r: _cell(_num(m(r, "ttft_s") * 1000), d(r, "ttft_s"), _range(r, "ttft_s", 1000))),
            ("prefill tok/s", lambda r: _cell(_num(m(r, "prefill_tok_s")), d(r, "prefill_tok_s"))),
            ("decode tok/s", lambda r: _cell(_num(m(r, "decode_tok_s")), d(r, "decode_tok_s"),
                                             _range(r, "decode_tok_s"))),
        ]
    if has["batch_decode_tok_s"]:
        columns.append((f"batch {method.get('settings', {}).get('batch', '')} tok/s",
                        lambda r: _cell(_num(m(r, "batch_decode_tok_s")), d(r, "batch_decode_tok_s"),
                                        _range(r, "batch_decode_tok_s"))))
    if has["weight_bandwidth_gb_s"]:
        columns.append(("weights GB/s", lambda r: _cell(_num(m(r, "weight_bandwidth_gb_s")), _pct_of_memory(r))))
    if has["peak_cuda_allocated_bytes"]:
        columns.append(("peak CUDA", lambda r: _cell(_bytes(m(r, "peak_cuda_allocated_bytes")),
                                                     d(r, "peak_cuda_allocated_bytes"))))
    elif has["peak_rss_bytes"]:
        columns.append(("peak RSS", lambda r: _cell(_bytes(m(r, "peak_rss_bytes")), d(r, "peak_rss_bytes"))))
    for name, _ in columns:
        table.add_column(name, justify="left" if name == "model" else "right", overflow="fold")
    for r in rows:
        table.add_row(*(render(r) for _, render in columns))
    return table


def _quant(q: dict | None) -> str:
    if not q:
        return ""
    method = q.get("quant_method", "quantized")
    if q.get("ggml_type"):
        return f"{method} {q['ggml_type']}"
    bits = q.get("bits") or (8 if q.get("load_in_8bit") else 4 if q.get("load_in_4bit") else None)
    return f"{method}{'' if bits is None else f' {bits}-bit'}"


HEAD_ROUNDING = {"int8": "int8", "int4": "int4",
                 "mixed": "int8 for the rows the model finds likeliest and int4 for the rest"}


def _caption(report: dict) -> str:
    m = report.get("method", {})
    s = m.get("settings", {})
    parts = []
    if m.get("quality"):
        bos = [r["name"] for r in report["models"] if r.get("bos_per_window")]
        parts.append(f"quality: {m.get('ppl_data_description') or m.get('ppl_data')}, {s.get('seq_len')}-token "
                     f"windows (cap {s.get('ppl_windows') or 'none'})"
                     + (f"; BOS first in each window for {', '.join(dict.fromkeys(bos))}" if bos else ""))
    for served, how in HEAD_ROUNDING.items():
        rounded = [r["name"] for r in report["models"] if r.get("runtime_head") == served]
        if rounded:
            parts.append(f"output head stored in full precision, rounded to {how} at load by llmopt's runtime "
                         f"(--head) for {', '.join(dict.fromkeys(rounded))}")
    parts.extend(_runtimes(report))
    if m.get("speed"):
        bw = m.get("memory_bandwidth_gb_s")
        parts.append(f"speed: prompt {s.get('prompt_len')}, {s.get('gen_len')} new tokens, median "
                     f"and min..max of {s.get('repeats')} interleaved rounds, {m.get('torch_threads')} threads"
                     + (f"; memory copy bandwidth {bw:.1f} GB/s (the % under weights GB/s)" if bw else ""))
    ref = m.get("size_reference") or {}
    original = ref.get("original_dtype")
    parts.append(f"weights: x fp32 = weight bytes / the baseline's {_count(ref.get('parameters'))} parameters in "
                 f"float32" + (f"; x {SHORT_DTYPES.get(original, original)} = in {original}, the dtype its original "
                               f"checkpoint stores" if original and original != "float32" else
                               "" if original else "; the original's stored dtype is unknown"))
    if any(r.get("same_tokenizer_as_baseline") is False for r in report["models"]):
        parts.append("other tokenizer: perplexity is per token of another vocabulary, so it is not compared (no "
                     "delta, KL or top-1); bits/byte is")
    parts.append("deltas vs baseline: x = model/baseline (timed: median of per-round ratios; ~ = within the "
                 "rounds' range)")
    return "\n".join(parts)


def _runtimes(report: dict) -> list[str]:
    """Which runtime ran which model, when llama.cpp ran one (a line for the caption)."""
    lc = report.get("method", {}).get("llama_cpp")
    if not lc:
        return []
    by: dict[str, list[str]] = {}
    for r in report["models"]:
        by.setdefault(r.get("runtime") or "?", []).append(r["name"])
    labels = {"llama.cpp": f"llama.cpp {lc['version']} ({lc['threads']} threads, timed in its own process with "
                           "OpenMP's default waiting)"}
    who = "; ".join(f"{labels.get(rt, rt)} for {', '.join(dict.fromkeys(names))}" for rt, names in by.items())
    return [f"runtime: {who}; llama.cpp is fed the same token ids and scored by the same code; its weights are "
            "the GGUF file's tensor bytes"]


# --------------------------------------------------------------------------- files

def _atomic_write(path: str | Path, data: bytes) -> None:
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


CSV_HEADER = ("name", "role", *METRIC_COLUMNS, *(f"{k}_x" for k in DELTA_COLUMNS))
PLOT_TITLE = "llmopt bench plot"      # the plot's metadata title: how --force knows a plot is bench's
_PLOT_MARKS = {".png": b"tEXtTitle\x00" + PLOT_TITLE.encode(), ".pdf": b"/Title (" + PLOT_TITLE.encode() + b")",
               ".svg": b"<title>" + PLOT_TITLE.encode() + b"</title>"}
_LARGEST_OWN_FILE = 64 << 20          # bench's CSVs and plots are far smaller: a larger file is someone else's
FORCE_RULE = ("only one llmopt bench wrote: a CSV whose first line is bench's header, a plot whose metadata "
              f"title is '{PLOT_TITLE}'; any other file is left alone")


def written_by_bench(path: str | Path, kind: str) -> bool:
    """Whether this `kind` ("csv" or "plot") file is one llmopt bench wrote, told by its content: a single
    file has no llmopt.json beside it to say so."""
    p = Path(path).expanduser()
    try:
        if not p.is_file() or p.stat().st_size > _LARGEST_OWN_FILE:
            return False
        data = p.read_bytes()
    except OSError:
        return False
    if kind == "plot":
        mark = _PLOT_MARKS.get(p.suffix.lower())
        return mark is not None and mark in data
    return data.split(b"\n", 1)[0] == ",".join(CSV_HEADER).encode()


def check_replaceable(path: str | Path, kind: str, force: bool, flag: str) -> None:
    """An output file may be written where nothing is, or with --force over a file bench wrote."""
    p = Path(path).expanduser()
    require(not p.is_dir(), f"{flag} {path} is a directory", "give a file name")
    if not p.exists() and not p.is_symlink():
        return
    require(force, f"{flag} {path} already exists", f"pass --force to replace it ({FORCE_RULE})")
    require(written_by_bench(p, kind), f"{flag} {path} exists and was not written by llmopt bench, so --force does "
            "not replace it", "give another path, or move that file away")


def csv_text(report: dict) -> str:
    """One row per model: name, role, every metric, then `<metric>_x` deltas vs the baseline."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in report["models"]:
        writer.writerow([r["name"], r["role"], *("" if r["metrics"].get(k) is None else r["metrics"][k]
                                                 for k in METRIC_COLUMNS),
                         *("" if k not in r["deltas"] else r["deltas"][k]["x"] for k in DELTA_COLUMNS)])
    return buf.getvalue()


def write_csv(report: dict, path: str | Path, force: bool = False) -> None:
    """Write the CSV through a temporary sibling and a rename; see `check_replaceable` for what it replaces."""
    check_replaceable(path, "csv", force, "--csv")
    _atomic_write(path, csv_text(report).encode())


def write_plot(report: dict, path: str | Path, force: bool = False) -> None:
    """Bits per byte (perplexity when some model lacks it) against decode speed and against weight size,
    one labelled point per model: bits per byte compares models whatever their tokenizers. Written like
    `write_csv`, with PLOT_TITLE in its metadata."""
    check_replaceable(path, "plot", force, "--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["models"] if r["metrics"].get("perplexity") is not None]
    y_key = "bits_per_byte" if all(r["metrics"].get("bits_per_byte") is not None for r in rows) else "perplexity"
    panels = [("weight_bytes", "weights in memory (MB)", 1e-6)]
    if any(r["metrics"].get("decode_tok_s") is not None for r in rows):
        panels.insert(0, ("decode_tok_s", "decode tokens/s (batch 1, median)", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for r in rows:
            x = r["metrics"].get(key)
            if x is None:
                continue
            base = r["role"] == "baseline"
            ax.scatter([x * scale], [r["metrics"][y_key]], marker="*" if base else "o",
                       s=140 if base else 60, color="black" if base else "tab:blue", zorder=3)
            ax.annotate(r["name"], (x * scale, r["metrics"][y_key]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{y_key.replace('_', ' ')} ({report['method'].get('ppl_data')})")
        ax.grid(alpha=0.3)
    fig.suptitle(f"llmopt bench: quality vs speed and size (lower {y_key.replace('_', ' ')} is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=120, metadata={"Title": PLOT_TITLE})
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
