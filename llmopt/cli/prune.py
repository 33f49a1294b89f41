"""`llmopt prune MODEL -o OUT --ratio R`: structured pruning (hidden size, depth, heads, MLP) to a standard
checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli.common import DataDir, Device, Dtype, Force, Json, RichProgress, app, err_console, human_count, \
    print_json
from llmopt.prune import PruneOptions, prune as run_prune
from llmopt.prune.importance import METHODS
from llmopt.prune.plan import AXES_HELP

D = PruneOptions


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Directory, .gguf file, hub id or alias (not already quantized).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory (written atomically).")],
    ratio: Annotated[float, typer.Option(help="Fraction of the model's TOTAL parameters to remove, in (0, 0.9] "
                                              "(embeddings included); the achieved numbers are reported.")
                     ] = D.ratio,
    target_params: Annotated[str | None, typer.Option(help="Parameter count to reach instead of --ratio, e.g. "
                                                           "100M or 1.5B.")] = D.target_params,
    axes: Annotated[str, typer.Option(help=f"What may lose parameters: {AXES_HELP}. hidden = residual-stream "
                                           "channels (embedding, every projection and norm, the output head); "
                                           "depth = whole layers; heads = query heads and KV groups; mlp = MLP "
                                           "channels. The split between them is measured on held-out "
                                           "calibration windows.")] = D.axes,
    importance: Annotated[str, typer.Option(help=f"Structure score: {', '.join(METHODS)}. taylor = |w * dL/dw| "
                                                 "summed per structure; obs = the output error left after the "
                                                 "least-squares refit; taylor-obs (default) = their product; "
                                                 "taylor2 adds the diagonal Fisher term to taylor; l2 = weight "
                                                 "magnitude; random = baseline. Hidden channels are scored by "
                                                 "activation and, with a gradient method, also by taylor: the "
                                                 "one that loses less at each size is used.")] = D.importance,
    split: Annotated[str, typer.Option(help="How the width budget is shared between attention and MLP: auto (try "
                                            "every attention shape that fits, keep the lowest calibration loss), "
                                            "mlp (MLP channels only) or a fraction in [0, 1] taken from attention "
                                            "(nearest feasible).")] = D.split,
    reconstruct: Annotated[bool, typer.Option("--reconstruct/--no-reconstruct",
                                              help="Refit the kept columns of o_proj / down_proj (and, when "
                                                   "hidden channels go, of q/k/v and the MLP inputs) by least "
                                                   "squares on calibration activations.")] = D.reconstruct,
    calib: Annotated[str, typer.Option(help="Calibration text: auto (wikitext2 when a data dir is set, else "
                                            "builtin), wikitext2, c4, builtin or a .txt/.jsonl path.")] = D.calib,
    nsamples: Annotated[int, typer.Option(help="Calibration windows (one forward/backward each for taylor).")
                        ] = D.nsamples,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = D.seq_len,
    seed: Annotated[int, typer.Option(help="Seed for calibration windows and random scores.")] = D.seed,
    layers: Annotated[str, typer.Option(help="Layers to prune: all, or a Python slice such as 1:-1. A standard "
                                             "config gives every layer the same widths, so only all is "
                                             "accepted today.")] = D.layers,
    multiple_of: Annotated[int, typer.Option(help="Round the kept MLP width and hidden size to a multiple of this.")
                           ] = D.multiple_of,
    data_dir: DataDir = None,
    device: Device = D.device,
    dtype: Dtype = D.dtype,
    force: Force = False,
    json: Json = False,
) -> None:
    """Remove hidden channels, layers, attention heads / KV groups and MLP channels; write a checkpoint plain
    transformers loads."""
    opts = PruneOptions(model=model, output=output, ratio=ratio, target_params=target_params, axes=axes,
                        importance=importance, calib=calib,
                        nsamples=nsamples, seq_len=seq_len, seed=seed, layers=layers, multiple_of=multiple_of,
                        split=split, reconstruct=reconstruct, data_dir=data_dir, device=device, dtype=dtype,
                        force=force)
    summary = run_prune(opts, RichProgress(not json))
    if json:
        print_json(summary)
        return
    if summary["channel_scores"]:
        err_console.print(_channels_table(summary))
    if summary["plans_tried"]:
        err_console.print(_plans_table(summary))
    err_console.print(_summary_table(summary))
    by_axis = ", ".join(f"{k} {human_count(v)}" for k, v in summary["parameters_removed_by_axis"].items() if v)
    err_console.print(f"removed {summary['ratio_achieved']:.2%} of all parameters ({by_axis}; "
                      f"{summary['decoder_ratio_achieved']:.2%} of the decoder layers)", highlight=False)
    err_console.print(f"[green]wrote[/green] {output}", highlight=False)


def _summary_table(summary: dict) -> Table:
    """Sizes and calibration loss before and after."""
    before, after = summary["widths_before"], summary["widths_after"]
    table = Table(title=f"llmopt prune ({summary['importance']})", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("parameters", human_count(summary["parameters_before"]), human_count(summary["parameters_after"]))
    table.add_row("decoder-layer parameters", human_count(summary["decoder_parameters_before"]),
                  human_count(summary["decoder_parameters_after"]))
    table.add_row("hidden size", str(summary["hidden_before"]), str(summary["hidden_after"]))
    table.add_row("layers", str(summary["layers_before"]), str(summary["layers_after"]))
    table.add_row("heads / KV heads", f"{before['heads']} / {before['kv_heads']}",
                  f"{after['heads']} / {after['kv_heads']}")
    table.add_row("intermediate size", str(before["intermediate"]), str(after["intermediate"]))
    table.add_row("calibration loss", f"{summary['calibration_loss_before']:.4f}",
                  f"{summary['calibration_loss_after']:.4f}")
    return table


def _plans_table(summary: dict) -> Table:
    """Every plan measured, with its held-out calibration loss; the chosen one marked."""
    table = Table(title=f"plans measured (held-out loss on {summary['calibration_loss_windows']} windows)",
                  title_justify="left")
    for name in ("stage", "hidden", "layers", "heads / KV", "intermediate", "parameters", "loss", ""):
        table.add_column(name, justify="left" if name == "stage" else "right")
    wa = summary["widths_after"]
    chosen = (summary["hidden_after"], summary["layers_after"], wa["heads"], wa["kv_heads"], wa["intermediate"])
    for p in summary["plans_tried"]:
        shape = (p["hidden"], p["layers"], p["heads"], p["kv_heads"], p["intermediate"])
        table.add_row(p["stage"], str(p["hidden"]), str(p["layers"]), f"{p['heads']} / {p['kv_heads']}",
                      str(p["intermediate"]), human_count(p["parameters"]), f"{p['calibration_loss']:.4f}",
                      "chosen" if shape == chosen else "")
    return table


def _channels_table(summary: dict) -> Table:
    """Per hidden size tried, the held-out loss of removing only channels, by each channel score; every plan
    at that size uses the lower."""
    rows = summary["channel_scores"]
    names = list(rows[0]["calibration_loss"])
    table = Table(title="channel scores (held-out loss, channels alone)", title_justify="left")
    for name in ("hidden", *names, "used"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["hidden"]), *(f"{r['calibration_loss'][n]:.4f}" for n in names), r["chosen"])
    return table
