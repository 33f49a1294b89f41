"""Quantization: GPTQ / RTN / int8 in the standard GPTQ layout (ours, in PyTorch) and bitsandbytes.

`quantize(opts)` validates, loads, transforms and writes one checkpoint; the method modules do
the work: `pipeline` for the GPTQ-layout methods, `bnb` for bitsandbytes.
"""

from __future__ import annotations

from llmopt.progress import SILENT, Progress
from llmopt.quantize.options import BNB_METHODS, QuantizeOptions


def quantize(opts: QuantizeOptions, progress: Progress = SILENT) -> dict:
    """Run `llmopt quantize`; returns the JSON-able summary also written to llmopt.json."""
    opts.validate()
    if opts.method in BNB_METHODS:
        from llmopt.quantize.bnb import quantize_bnb

        return quantize_bnb(opts, progress)
    from llmopt.quantize.pipeline import quantize_gptq

    return quantize_gptq(opts, progress)


__all__ = ["QuantizeOptions", "quantize"]
