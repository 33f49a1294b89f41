"""What a pruned model keeps, what that costs in parameters, and which plans are worth measuring.

Four axes can lose parameters: `hidden` (residual-stream channels: the embedding, every projection
that reads or writes the residual stream, every norm over it, the output head), `depth` (whole
decoder layers), `heads` (query heads and KV groups) and `mlp` (MLP channels). A plan is a `Shape`:
the hidden size, the layer count and the per-layer widths. How the budget is shared between the
axes is not fixed: `grid` proposes plans that take different shares of it from hidden and depth
(width takes the rest) and the caller measures them on held-out windows.

Parameter counts are exact and need no weights: `Counter` reads one layer's module shapes from a
(meta) model, so thousands of shapes are counted without building a model for each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from llmopt.errors import UserError
from llmopt.info import count_parameters
from llmopt.prune.structure import Arch, Candidate, Geometry, Widths, candidates, decoder_layers, module

AXES = ("hidden", "depth", "heads", "mlp")
AXES_HELP = "auto (all four) or a comma-separated subset of hidden, depth, heads, mlp"
HIDDEN_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)   # shares of the budget the grid takes from the hidden size
DEPTH_SHARES = (0.0, 0.25, 0.5, 1.0)          # ... and from whole layers; width takes the rest
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_axes(text: str) -> tuple[str, ...]:
    """`auto` or a comma-separated subset of AXES, in AXES order; UserError otherwise."""
    value = str(text).strip().lower()
    if value in ("auto", "all"):
        return AXES
    names = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in names if a not in AXES]
    if unknown or not names:
        raise UserError(f"unknown --axes '{', '.join(unknown) or text}'", hint=f"use {AXES_HELP}")
    return tuple(a for a in AXES if a in names)


def parse_count(text: str | int) -> int:
    """A parameter count such as 100M, 1.5B, 250k or 123456."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmbg]?)\s*", str(text).lower())
    if not m:
        raise UserError(f"invalid --target-params '{text}'", hint="use a count such as 100M, 1.5B or 120000000")
    n = int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))
    if n <= 0:
        raise UserError(f"--target-params must be positive, got {text}")
    return n


@dataclass(frozen=True)
class Shape:
    """What the pruned model keeps."""

    hidden: int
    layers: int
    widths: Widths

    def describe(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers, {self.widths.describe()}"


def full_shape(geo: Geometry) -> Shape:
    return Shape(geo.hidden, geo.layers, Widths(geo.heads, geo.kv_heads, geo.intermediate))


class Counter:
    """Exact parameter counts of shapes of one model, from the shapes of its modules (meta is fine)."""

    def __init__(self, model: torch.nn.Module, arch: Arch, geo: Geometry, norms_per_layer: int) -> None:
        layer = decoder_layers(model)[0]
        self.geo = geo
        has_bias = {n: module(layer, n).bias is not None for n in (arch.q, arch.k, arch.v, arch.o, arch.mlp_out)}
        self.q_bias, self.k_bias, self.v_bias = has_bias[arch.q], has_bias[arch.k], has_bias[arch.v]
        self.out_biases = int(has_bias[arch.o]) + int(has_bias[arch.mlp_out])   # each of size hidden
        self.mlp_in_biases = sum(module(layer, n).bias is not None for n in arch.mlp_in)
        self.mlp_inputs = len(arch.mlp_in)
        self.norms = norms_per_layer
        self.fixed_layer = sum(module(layer, n).weight.numel() for n in arch.head_norms)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.vocab = emb.weight.shape[0]
        self.tables = 1 if head is None or head.weight is emb.weight else 2
        self.rest = 0
        self.rest = count_parameters(model) - self.count(full_shape(geo))   # anything of fixed size

    def layer(self, h: int, w: Widths) -> int:
        """Parameters of one decoder layer."""
        d = self.geo.head_dim
        n = 2 * h * d * (w.heads + w.kv_heads)                               # q and o, k and v
        n += d * (w.heads * self.q_bias + w.kv_heads * (self.k_bias + self.v_bias))
        n += w.intermediate * (h * (self.mlp_inputs + 1) + self.mlp_in_biases)
        return n + h * (self.out_biases + self.norms) + self.fixed_layer

    def count(self, shape: Shape) -> int:
        """Parameters of the model at this shape (tied embeddings counted once, the final norm included)."""
        h = shape.hidden
        return self.vocab * h * self.tables + h + shape.layers * self.layer(h, shape.widths) + self.rest


@dataclass(frozen=True)
class Option:
    """A plan to measure: the shape, its exact size, and what each axis takes."""

    shape: Shape
    parameters: int
    removed: dict[str, int]          # parameters taken by hidden, depth and width (heads + mlp)

    def record(self) -> dict:
        w = self.shape.widths
        return {"hidden": self.shape.hidden, "layers": self.shape.layers, "heads": w.heads, "kv_heads": w.kv_heads,
                "intermediate": w.intermediate, "parameters": self.parameters, "removed": dict(self.removed)}


def option(counter: Counter, shape: Shape) -> Option:
    """The option for a shape, with the removal attributed to hidden, then depth, then width."""
    g = counter.geo
    full = Widths(g.heads, g.kv_heads, g.intermediate)
    p0 = counter.count(full_shape(g))
    p_h = counter.count(Shape(shape.hidden, g.layers, full))
    p_d = counter.count(Shape(shape.hidden, shape.layers, full))
    n = counter.count(shape)
    return Option(shape, n, {"hidden": p0 - p_h, "depth": p_h - p_d, "width": p_d - n})


def widths_at(geo: Geometry, hidden: int, layers: int, budget: float, axes: tuple[str, ...],
              multiple_of: int) -> list[Candidate]:
    """The width options (heads, MLP) that remove `budget` more parameters from a model already cut to
    `hidden` channels and `layers` layers."""
    at = replace(geo, hidden=hidden, layers=layers)
    return candidates(at, max(budget, 0.0), multiple_of, heads="heads" in axes, mlp="mlp" in axes)


def grid(counter: Counter, budget: float, axes: tuple[str, ...], multiple_of: int,
         attention_share: float) -> list[Option]:
    """Plans that take shares of the budget from the hidden size and from depth, the rest from width with
    the attention share closest to `attention_share` (the one measured best for width alone). With no
    width axis, the last of hidden/depth takes what is left, rounded up so the budget is met."""
    g = counter.geo
    width = "heads" in axes or "mlp" in axes
    hs = HIDDEN_SHARES if "hidden" in axes else (0.0,)
    ds = DEPTH_SHARES if "depth" in axes else (0.0,)
    out: dict[Shape, Option] = {}
    for s_h in hs:
        for s_d in ds:
            if s_h + s_d > 1 + 1e-9 or (s_h + s_d == 0 and width) or (not width and s_h + s_d < 1 - 1e-9):
                continue
            point = _cut(counter, budget, s_h, s_d, width, multiple_of)
            if point is None:
                continue
            hidden, layers, left = point
            opts = widths_at(g, hidden, layers, left, axes, multiple_of)
            if not opts:
                continue
            c = min(opts, key=lambda c: (abs(c.attention_removed - attention_share * c.removed), -c.widths.heads))
            o = option(counter, Shape(hidden, layers, c.widths))
            if counter.count(full_shape(g)) - o.parameters >= budget - 0.5 and (hidden, layers) != (g.hidden, g.layers):
                out.setdefault(o.shape, o)
    return list(out.values())


def _cut(counter: Counter, budget: float, s_h: float, s_d: float, width: bool,
         multiple_of: int) -> tuple[int, int, float] | None:
    """(hidden kept, layers kept, budget left for width) for these shares; None when not possible."""
    g = counter.geo
    full = Widths(g.heads, g.kv_heads, g.intermediate)
    p0 = counter.count(full_shape(g))
    per_channel = (p0 - counter.count(Shape(g.hidden - multiple_of, g.layers, full))) / multiple_of
    channels = s_h * budget / per_channel / multiple_of
    last = not width and s_d == 0
    hidden = g.hidden - multiple_of * (math.ceil(channels - 1e-9) if last else math.floor(channels + 1e-9))
    if hidden < multiple_of:
        return None
    at_h = counter.count(Shape(hidden, g.layers, full))
    per_layer = at_h - counter.count(Shape(hidden, g.layers - 1, full))
    want = (budget - (p0 - at_h)) if not width else s_d * budget
    layers = g.layers - (math.ceil(want / per_layer - 1e-9) if not width else math.floor(want / per_layer + 1e-9))
    if layers < 1 or (s_d > 0 and layers == g.layers):
        return None
    return hidden, layers, budget - (p0 - counter.count(Shape(hidden, layers, full)))


def smallest(counter: Counter, axes: tuple[str, ...], multiple_of: int) -> Shape:
    """The smallest shape these axes can reach: one query head over one KV head, `multiple_of` MLP
    channels and hidden channels, one layer (each only where its axis is allowed)."""
    g = counter.geo
    heads, kv = (1, 1) if "heads" in axes else (g.heads, g.kv_heads)
    inter = min(multiple_of, g.intermediate) if "mlp" in axes else g.intermediate
    step = multiple_of * heads // math.gcd(multiple_of, heads)
    hidden = min(step, g.hidden) if "hidden" in axes else g.hidden
    layers = 1 if "depth" in axes else g.layers
    return Shape(hidden, layers, Widths(heads, kv, inter))
