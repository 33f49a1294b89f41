"""Sibling projections that read the same input (q/k/v, gate/up) run as one quantized matmul.

At decode a 135M model's layers are so small that each weight-only kernel call costs mostly its fixed
overhead: on SmolLM2's shapes one int4 call for q, k and v together (960 x 576) takes about 70 us
against 180 us for the three, and gate+up (3072 x 576) 80 us against 145 us (docs/runtime.md). So
llmopt's runtime builds one `QuantLinear` from the siblings' concatenated codes, and each sibling
becomes a `ProjectionSlice` that returns its columns of that one output. The modeling code is not
touched: it still calls `q_proj(x)`, `k_proj(x)`, `v_proj(x)`; the first call computes all of them
and the others take their slice while the input is the same tensor, unchanged (anything else is
computed afresh, so a caller that interleaves calls only loses the saving). An in-place change of
the input between the calls is caught through its version counter, except for inference-mode tensors,
which have none: there the siblings rely on the modeling code calling them back to back, as
transformers' attention and MLP blocks do.
"""

from __future__ import annotations

import torch

from llmopt.quantize.qlinear import QuantLinear

# names of the Linears that take the same input, in the order the modeling code calls them
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

Unit = tuple  # (q [N, K], zeros [G, N], scales [G, N], g_idx [K], bias or None, bits, group_size)


def _version(x: torch.Tensor) -> int:
    """-1 where there is no version counter: inference-mode tensors, and inside a compiled graph (which
    cannot ask), where the siblings rely on being called back to back, as in inference mode."""
    if torch.compiler.is_compiling():
        return -1
    return -1 if x.is_inference() else x._version


class _SharedOutput:
    """The fused layer and its last output, kept until every sibling has taken its slice."""

    def __init__(self, fused: QuantLinear, count: int) -> None:
        self.fused, self.count = fused, count
        self.x: torch.Tensor | None = None
        self.version, self.y, self.pending = -1, None, set()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.x is x and self.version == _version(x) and index in self.pending:
            y = self.y
            self.pending.discard(index)
        else:
            y = self.fused(x)
            self.pending = set(range(self.count)) - {index}
            self.x, self.version, self.y = x, _version(x), y
        if not self.pending:                      # every slice taken: hold nothing between steps
            self.x = self.y = None
        return y


class ProjectionSlice(torch.nn.Module):
    """Columns [start, stop) of a fused projection's output, standing where one sibling Linear stood.
    The first sibling registers the fused layer (its buffers are counted and moved once)."""

    def __init__(self, shared: _SharedOutput, index: int, start: int, stop: int) -> None:
        super().__init__()
        if index == 0:
            self.fused = shared.fused
        self.__dict__["shared"] = shared
        self.index, self.start, self.stop = index, start, stop
        self.in_features, self.out_features = shared.fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.index)[..., self.start:self.stop]

    @property
    def perm(self) -> torch.Tensor | None:
        return self.shared.fused.perm

    def dequantized_weight_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This sibling's W^T [K, N], as `QuantLinear.dequantized_weight_t` gives it."""
        return self.shared.fused.dequantized_weight_t(dtype)[:, self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a fused projection"


def outputs(modules: tuple[torch.nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """What calling each module on x gives, in one call of the fused layer where the modules are all the
    slices of one, in order (without the bookkeeping that lets modeling code call them one by one)."""
    first = modules[0]
    shared = first.shared if isinstance(first, ProjectionSlice) else None
    if shared is None or len(modules) != shared.count or any(
            not isinstance(m, ProjectionSlice) or m.shared is not shared or m.index != i for i, m in enumerate(modules)):
        return [m(x) for m in modules]
    y = shared.fused(x)
    return [y[..., m.start:m.stop] for m in modules]


def fusable(units: list[Unit]) -> bool:
    """Same bits, group size, column grouping (g_idx) and input width; biases all present or all absent."""
    first = units[0]
    return all(u[5] == first[5] and u[6] == first[6] and u[0].shape[1] == first[0].shape[1]
               and torch.equal(u[3], first[3]) and (u[4] is None) == (first[4] is None) for u in units)


def fuse(units: list[Unit], device: torch.device, build=QuantLinear) -> list[ProjectionSlice]:
    """One layer (`build`: QuantLinear's signature) over the siblings' output rows, and a slice module
    for each sibling."""
    q = torch.cat([u[0] for u in units])
    zeros = torch.cat([u[1] for u in units], dim=1)
    scales = torch.cat([u[2] for u in units], dim=1)
    bias = None if units[0][4] is None else torch.cat([u[4] for u in units])
    fused = build(q, zeros, scales, units[0][3], bias, units[0][5], units[0][6], device)
    shared = _SharedOutput(fused, len(units))
    bounds = torch.tensor([0] + [u[0].shape[0] for u in units]).cumsum(0).tolist()
    return [ProjectionSlice(shared, i, bounds[i], bounds[i + 1]) for i in range(len(units))]


def sibling_groups(prefixes: list[str]) -> list[list[str]]:
    """The quantized module names that fuse: every name of a SIBLINGS tuple present under one parent."""
    present = set(prefixes)
    groups = []
    for prefix in prefixes:
        parent, _, name = prefix.rpartition(".")
        for names in SIBLINGS:
            if name == names[0]:
                group = [f"{parent}.{n}" if parent else n for n in names]
                if all(g in present for g in group):
                    groups.append(group)
    return groups
