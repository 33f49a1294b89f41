"""`llmopt export MODEL -o OUT.gguf`: a GGUF file for llama.cpp, GPTQ layers mapped onto GGML blocks."""

from __future__ import annotations

from typing import Annotated

import typer

from llmopt.cli.common import Force, Json, RichProgress, app, err_console, human_bytes, print_json
from llmopt.export import ExportOptions, export as run_export
from llmopt.export.options import TYPE_HELP

D = ExportOptions


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Local directory (any llmopt output included) or alias.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .gguf file (written atomically).")],
    type: Annotated[str, typer.Option("--type", help=TYPE_HELP)] = D.type,  # noqa: A002 - the flag's name
    force: Force = False,
    json: Json = False,
) -> None:
    """Write a model as one GGUF file that llama.cpp loads (metadata, tokenizer, chat template, tensors)."""
    summary = run_export(ExportOptions(model=model, output=output, type=type, force=force), RichProgress(not json))
    if json:
        print_json(summary)
        return
    types = ", ".join(f"{t} x{v['tensors']}" for t, v in summary["tensor_types"].items())
    err_console.print(f"{summary['type']}: {types}; {human_bytes(summary['file_bytes'])}", highlight=False)
    if summary["gptq_layers"]:
        how = ", ".join(f"{n} {k}" for k, n in summary["mappings"].items())
        err_console.print(f"GPTQ layers: {how}; largest error against the checkpoint's weights: "
                          f"{summary['max_abs_error']:.3g} absolute, {summary['max_rel_error']:.3g} relative "
                          f"{'(' + summary['worst_layer'] + ')' if summary['worst_layer'] else '(bit-exact)'}",
                          highlight=False)
    err_console.print(f"[green]wrote[/green] {output}", highlight=False)
