"""`llmopt bench MODEL... [--baseline B]`: size, memory, speed and quality side by side, with deltas."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from llmopt.bench.llamacpp import GGUF_RUNTIME_HELP
from llmopt.bench.report import FORCE_RULE, render_table
from llmopt.bench.run import BenchOptions, bench as run_bench
from llmopt.cli.common import DataDir, Device, Dtype, Head, Json, RichProgress, app, err_console, print_json

D = BenchOptions


@app.command()
def bench(
    models: Annotated[list[str], typer.Argument(help="Models to measure: directories, .gguf files, hub ids or "
                                                     "aliases. Without --baseline the first one is the baseline.")],
    baseline: Annotated[str | None, typer.Option(help="The model every delta is computed against (shown "
                                                      "first).")] = D.baseline,
    ppl_data: Annotated[str, typer.Option(help="Quality text: auto (wikitext2 when a data dir is set, else "
                                               "builtin, Python's docs: always offline), wikitext2, c4, builtin, "
                                               "or a .txt/.jsonl path (a WikiText .raw file is read as "
                                               "wikitext2 reads it).")] = D.ppl_data,
    seq_len: Annotated[int, typer.Option(help="Tokens per perplexity window (non-overlapping), the BOS included "
                                              "when the model's tokenizer adds one.")] = D.seq_len,
    ppl_windows: Annotated[int, typer.Option(help="Score at most this many windows, from the start of the "
                                                  "text (0 = all).")] = D.ppl_windows,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens for prefill / time to first token (real "
                                                 "text).")] = D.prompt_len,
    gen_len: Annotated[int, typer.Option(help="New tokens decoded greedily per timed run.")] = D.gen_len,
    batch: Annotated[int, typer.Option(help="Also measure decode throughput with N prompts at once (0 = "
                                            "off).")] = D.batch,
    repeats: Annotated[int, typer.Option(help="Measured timing rounds; every round runs every model once, "
                                              "interleaved.")] = D.repeats,
    warmup: Annotated[int, typer.Option(help="Warm-up rounds before the measured ones (discarded).")] = D.warmup,
    skip_quality: Annotated[bool, typer.Option("--skip-quality", help="Skip perplexity, KL and "
                                                                      "agreement.")] = D.skip_quality,
    skip_speed: Annotated[bool, typer.Option("--skip-speed", help="Skip timing and memory.")] = D.skip_speed,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure peak memory while generating, "
                                         "in a fresh process per model.")] = D.memory,
    seed: Annotated[int, typer.Option(help="Seed for choosing the prompt tokens.")] = D.seed,
    csv: Annotated[str | None, typer.Option(help="Also write the table as CSV to this path.")] = D.csv,
    plot: Annotated[str | None, typer.Option(help="Also draw perplexity vs decode speed and size to this "
                                                  ".png/.pdf/.svg (needs llmopt[plot]).")] = D.plot,
    force: Annotated[bool, typer.Option("--force", help=f"Replace an existing --csv / --plot file, but "
                                        f"{FORCE_RULE}.")] = D.force,
    data_dir: DataDir = D.data_dir,
    device: Device = D.device,
    dtype: Dtype = D.dtype,
    head: Head = D.head,
    gguf_runtime: Annotated[str, typer.Option(help=GGUF_RUNTIME_HELP)] = D.gguf_runtime,
    compile: Annotated[bool, typer.Option("--compile", help="Decode through torch.compile over a static KV cache "
                                          "(every PyTorch model; compiling takes tens of seconds to minutes and "
                                          "is reported as compile_s, not timed).")] = D.compile,
    json: Json = False,
) -> None:
    """Measure models side by side (one process, interleaved rounds, same data) and show deltas vs a baseline.

    Perplexity is compared only between models with the baseline's tokenizer; bits per byte between all.
    """
    opts = BenchOptions(models=list(models), baseline=baseline, ppl_data=ppl_data, data_dir=data_dir,
                        seq_len=seq_len, ppl_windows=ppl_windows, prompt_len=prompt_len, gen_len=gen_len,
                        batch=batch, repeats=repeats, warmup=warmup, skip_quality=skip_quality,
                        skip_speed=skip_speed, memory=memory, device=device, dtype=dtype, head=head, seed=seed, csv=csv,
                        plot=plot, force=force, gguf_runtime=gguf_runtime,
                        compile=compile)
    report = run_bench(opts, RichProgress(not json))
    if json:
        print_json(report)
    else:
        table = render_table(report)
        # a log file is no terminal: let the table take the width it needs, not rich's default of 80 columns
        console = err_console if err_console.is_terminal else Console(stderr=True, width=240)
        console.print(table)
