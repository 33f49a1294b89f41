"""`llmopt info MODEL`: what a model is, in numbers."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli.common import Device, Dtype, Json, RichProgress, app, err_console, human_bytes, human_count, \
    print_json
from llmopt.info import model_info
from llmopt.models import load_model


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Directory, .gguf file, hub id or alias.")],
    device: Device = "cpu",
    dtype: Dtype = "auto",
    json: Json = False,
) -> None:
    """Show architecture, layers, widths, heads, vocab, parameter counts, dtype, quantization and sizes (against
    float32 and against the dtype the original checkpoint stores)."""
    loaded = load_model(model, device=device, dtype=dtype, progress=RichProgress(not json))
    facts = model_info(loaded.model, loaded.path)
    facts["model"] = model
    facts["path"] = str(loaded.path) if loaded.path else None
    if json:
        print_json(facts)
        return
    table = Table(title=f"llmopt info {model}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("architecture", f"{facts['architecture']} ({facts['model_type']})"),
        ("layers", facts["layers"]), ("hidden size", facts["hidden_size"]),
        ("attention heads / KV heads", f"{facts['attention_heads']} / {facts['kv_heads']} "
                                       f"(head dim {facts['head_dim']})"),
        ("intermediate size", facts["intermediate_size"]), ("vocab", facts["vocab_size"]),
        ("parameters", f"{human_count(facts['parameters'])} ({facts['parameters']:,})"),
        ("  embeddings", f"{human_count(facts['embedding_parameters'])}"
                         f"{' (tied with lm_head)' if facts['tied_embeddings'] else ''}"),
        ("  non-embedding", human_count(facts["non_embedding_parameters"])),
        ("dtype", f"{facts['dtype']} in memory, {facts['stored_dtype'] or 'unknown'} stored, original "
                  f"{facts['original_dtype'] or 'unknown'}"),
        ("quantization", _quant(facts["quantization"])),
        ("weights in memory", f"{human_bytes(facts['weight_bytes'])} ({facts['bits_per_weight']} bits/weight)"),
        ("  vs float32", _ratio(facts["size_vs_float32_x"])),
        ("  vs the original's dtype", _ratio(facts["size_vs_original_dtype_x"], facts["original_dtype"])),
        ("size on disk", human_bytes(facts["disk_bytes"])),
        ("path", facts["path"] or "-"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    err_console.print(table)


def _ratio(x: float | None, dtype: str | None = "float32") -> str:
    return "unknown (the original's stored dtype is unknown)" if x is None else f"{x:.2f}x ({dtype})"


def _quant(q: dict | None) -> str:
    if not q:
        return "none"
    keys = ("bits", "group_size", "desc_act", "sym", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type")
    return q.get("quant_method", "?") + " " + " ".join(f"{k}={q[k]}" for k in keys if k in q)
