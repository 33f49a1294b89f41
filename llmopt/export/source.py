"""Reading a checkpoint tensor by tensor for export: full-precision tensors as they are stored, GPTQ layers as
their integer codes, zero points and scales (never dequantized here), so the block mapping sees what GPTQ chose."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.errors import UserError, require
from llmopt.quantize import packing

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass
class GPTQLayer:
    """One GPTQ Linear: W[n, k] = (q[n, k] - zeros[g_idx[k], n]) * scales[g_idx[k], n]."""

    q: torch.Tensor          # [N, K] int32 codes
    zeros: torch.Tensor      # [G, N] int32 true zero points
    scales: torch.Tensor     # [G, N] float32 (fp16 values in the checkpoint)
    g_idx: torch.Tensor      # [K] int64
    bits: int
    group_size: int
    sym: bool

    def dequantize(self) -> torch.Tensor:
        return packing.dequantize(self.q, self.zeros, self.scales, self.g_idx)


class Checkpoint:
    """The tensors of a local Hugging Face directory (safetensors), full precision or GPTQ."""

    def __init__(self, path: Path, config: dict) -> None:
        from safetensors import safe_open

        self.path = path
        self.config = config
        q = config.get("quantization_config")
        self.gptq = q if isinstance(q, dict) and q.get("quant_method") == "gptq" else None
        if isinstance(q, dict) and self.gptq is None:
            raise UserError(f"{path} is quantized with {q.get('quant_method')}, which has no GGUF mapping",
                            hint="export the full-precision model, or a GPTQ checkpoint")
        self._files: dict[str, Path] = {}
        self._dtypes: dict[str, str] = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for key in st.keys():
                    self._files[key] = f
                    self._dtypes[key] = st.get_slice(key).get_dtype()
        require(bool(self._files), f"{path} has no .safetensors weights",
                "re-save the model with safetensors (transformers' save_pretrained does by default)")

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def stored_dtype(self) -> str:
        """The dtype holding most of the floating tensors (by count: enough to tell bf16 from f16 / f32)."""
        floats = [d for d in self._dtypes.values() if d in ("F32", "F16", "BF16")]
        return max(set(floats), key=floats.count) if floats else "F32"

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[name], "pt") as st:
            return st.get_tensor(name)

    def modules(self) -> list[tuple[str, str]]:
        """(module or tensor name, kind) in file order: kind 'gptq' for a packed Linear, else 'tensor'."""
        out, seen = [], set()
        for name in self._files:
            module, _, leaf = name.rpartition(".")
            if leaf in GPTQ_PARTS and f"{module}.qweight" in self._files:
                if module not in seen:
                    seen.add(module)
                    out.append((module, "gptq"))
                if leaf == "bias":
                    out.append((name, "tensor"))
                continue
            out.append((name, "tensor"))
        return out

    def gptq_layer(self, module: str) -> GPTQLayer:
        """Unpack one GPTQ Linear (bits and group size from quantization_config, with its `dynamic` overrides)."""
        spec = self._module_spec(module)
        fmt = self.gptq.get("checkpoint_format") or self.gptq.get("format") or "gptq"
        tensors = {k: self.tensor(f"{module}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")
                   if f"{module}.{k}" in self._files}
        bits, group = int(spec["bits"]), int(spec.get("group_size", -1))
        k, n = tensors["qweight"].shape[0] * 32 // bits, tensors["qweight"].shape[1]
        q, zeros, scales, g_idx = packing.unpack_layer(tensors, bits, fmt, k, n, group)
        return GPTQLayer(q, zeros, scales, g_idx, bits, group, bool(spec.get("sym", True)))

    def _module_spec(self, module: str) -> dict:
        """quantization_config's keys, overridden by the first positive `dynamic` pattern matching the module."""
        spec = dict(self.gptq)
        for key, override in (self.gptq.get("dynamic") or {}).items():
            negative, pattern = key.startswith("-:"), re.sub(r"^[+-]:", "", key)
            if not negative and re.match(pattern, module):
                spec.update(override)
                break
        return spec
