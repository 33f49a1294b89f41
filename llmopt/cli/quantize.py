"""`llmopt quantize MODEL -o OUT`: GPTQ / RTN / int8 (GPTQ layout) or bitsandbytes LLM.int8 / NF4 / FP4."""

from __future__ import annotations

from typing import Annotated

import typer

from llmopt.cli.common import DataDir, Device, Dtype, Force, Json, RichProgress, app, err_console, print_json
from llmopt.quantize import QuantizeOptions, quantize as run_quantize
from llmopt.quantize.options import LM_HEAD_HELP, METHODS, SKIP_HELP

D = QuantizeOptions


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Directory, .gguf file, hub id or alias.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory (written atomically).")],
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}. gptq/rtn/int8 write the standard "
                                             "GPTQ layout; llm-int8/nf4/fp4 use bitsandbytes.")] = D.method,
    bits: Annotated[int | None, typer.Option(help="2, 3, 4 or 8 (default 4; 8 for int8). Not for bitsandbytes "
                                                  "methods.")] = D.bits,
    group_size: Annotated[int, typer.Option(help="Columns per quantization group: 32, 64, 128, ... or -1 for "
                                                 "one group per output channel. Halved (with a note) until it "
                                                 "divides every quantized Linear's input width: transformers, "
                                                 "GPTQModel and vLLM refuse a partial last group.")] = D.group_size,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (classic gptq format) or asymmetric "
                                                           "(gptq_v2 format) zero points.")] = D.sym,
    desc_act: Annotated[bool, typer.Option("--desc-act/--no-desc-act", help="Act-order: quantize columns by "
                                           "decreasing Hessian diagonal (static groups: no cost at inference).")] = D.desc_act,
    true_sequential: Annotated[bool, typer.Option("--true-sequential/--no-true-sequential",
                                                  help="Inside a layer, quantize q/k/v, o, gate/up, down in "
                                                       "order, each seeing quantized inputs.")] = D.true_sequential,
    damp: Annotated[float, typer.Option(help="Hessian dampening as a fraction of its mean diagonal.")] = D.damp,
    mse: Annotated[bool | None, typer.Option("--mse/--no-mse", help="gptq/rtn: shrink each group's range where "
                                             "that lowers its rounding error (clips a few outliers for a finer "
                                             "step). Default: on for gptq, off for rtn.")] = D.mse,
    block_size: Annotated[int, typer.Option(help="Columns per lazy-batch GPTQ update.")] = D.block_size,
    calib: Annotated[str, typer.Option(help="Calibration text: auto (wikitext2 when a data dir is set, else "
                                            "builtin), wikitext2, c4, builtin or a .txt/.jsonl path.")] = D.calib,
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = D.nsamples,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = D.seq_len,
    seed: Annotated[int, typer.Option(help="Seed for picking calibration windows.")] = D.seed,
    skip: Annotated[list[str] | None, typer.Option(help=SKIP_HELP)] = None,
    lm_head: Annotated[bool, typer.Option("--lm-head/--no-lm-head", help=LM_HEAD_HELP)] = D.lm_head,
    threshold: Annotated[float, typer.Option(help="llm-int8: outlier threshold.")] = D.threshold,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="nf4/fp4: also quantize the "
                                                                       "quantization constants.")] = D.double_quant,
    compute_dtype: Annotated[str, typer.Option(help="nf4/fp4: dtype of the matmuls.")] = D.compute_dtype,
    data_dir: DataDir = None,
    device: Device = D.device,
    dtype: Dtype = D.dtype,
    force: Force = False,
    json: Json = False,
) -> None:
    """Quantize a model's Linear layers and write a checkpoint that transformers / vLLM load."""
    opts = QuantizeOptions(model=model, output=output, method=method, bits=bits, group_size=group_size, sym=sym,
                           desc_act=desc_act, true_sequential=true_sequential, damp=damp, mse=mse, block_size=block_size,
                           calib=calib, nsamples=nsamples, seq_len=seq_len, seed=seed, skip=list(skip or []),
                           lm_head=lm_head,
                           threshold=threshold, double_quant=double_quant, compute_dtype=compute_dtype,
                           data_dir=data_dir, device=device, dtype=dtype, force=force)
    summary = run_quantize(opts, RichProgress(not json))
    if json:
        print_json(summary)
    else:
        err_console.print(f"[green]wrote[/green] {output}", highlight=False)
