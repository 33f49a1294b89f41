"""Layer-by-layer quantization of a decoder stack, shared by GPTQ and round-to-nearest.

The calibration windows are run through the embeddings once and the inputs of the first decoder
layer kept (with the keyword arguments every layer receives: attention masks, rotary position
embeddings). Then, one layer at a time on the compute device (the rest of the model stays where
it was loaded, normally CPU memory):

1. its Linears are split into *stages* of modules that read the same input, in execution order
   (LLaMA: q/k/v, o, gate/up, down); without true-sequential mode there is one stage;
2. for each stage, the layer runs on the calibration inputs until every module of the stage has
   seen its input (the rest of the forward is cut short), accumulating H = 2XX^T once per
   distinct input; the stage's modules are quantized and their weights replaced by the
   dequantized result, so later stages see quantized predecessors;
3. the layer runs once more with all weights quantized and its outputs become the next layer's
   inputs.

A sub-block whose Linears are all quantized (the attention block once q/k/v and o are done) gets the
same inputs and weights on every later pass, so its outputs are recorded on the next pass and
replayed after that instead of recomputed: the gate/up pass records the attention block, the down
pass and the final pass replay it. This keeps the layer-by-layer time near its floor of two plain
forward passes (docs/quantize.md), at the cost of one more copy of the calibration activations.

The output head (optional) comes last: its calibration inputs are the final norm applied to the
last layer's outputs. Its dequantized weight is not written back: nothing runs after it, and a head
tied to the input embeddings would change them too.

Round-to-nearest needs no calibration and skips the forward passes entirely.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from llmopt.errors import UserError
from llmopt.progress import SILENT, Progress
from llmopt.quantize.gptq import HessianAccumulator, LayerResult
from llmopt.quantize.options import skip_matches

# solve(full_name, linear, H or None) -> LayerResult
Solver = Callable[[str, torch.nn.Linear, "torch.Tensor | None"], LayerResult]


class _Stop(Exception):
    """Cuts a forward short once the needed inputs are captured."""


@dataclass
class Quantized:
    name: str
    layer: int | None          # decoder index; None for the output head
    result: LayerResult
    seconds: float


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder stack: the ModuleList holding num_hidden_layers blocks."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return name, module
    raise ValueError("could not find the decoder layers of this model")


def meta_model(where: str) -> torch.nn.Module:
    """The model built from its config on the meta device: its module tree, with no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(where)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def refuse_fused_weights(model: torch.nn.Module, method: str) -> None:
    """Refuse decoder layers holding weights of more than two dimensions outside nn.Linear.

    transformers 5 keeps mixture-of-experts experts (Mixtral, Qwen2/3-MoE, ...) as fused
    [experts, out, in] parameters. Neither the GPTQ layout nor bitsandbytes replaces them, so only
    the attention would be quantized while the output claims a quantized model.
    """
    prefix, layers = decoder_layers(model)
    fused = [(f"{prefix}.{n}", list(p.shape)) for n, p in layers.named_parameters() if p.dim() > 2]
    if fused:
        name, shape = fused[0]
        raise UserError(f"--method {method} cannot quantize this model: {len(fused)} of its decoder weights are "
                        f"fused tensors, not Linear layers (e.g. {name} {shape}: mixture-of-experts experts), "
                        "and would stay in full precision while the rest is quantized",
                        hint="llmopt quantizes dense models; MoE experts are not supported")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_inputs(model: torch.nn.Module, windows: torch.Tensor, device: torch.device
                   ) -> tuple[torch.Tensor, list[dict]]:
    """First-layer inputs [n, L, hidden] on `device` and the keyword arguments of every layer."""
    _, layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict | None] = [None] * len(layers)
    originals = [(layer.forward, "forward" in layer.__dict__) for layer in layers]

    def recorder(i: int):
        def forward(hidden_states, *args, **kw):
            if i == 0:
                inputs.append(hidden_states.detach().to(device))
            if kwargs[i] is None:
                kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
                kwargs[i] = _to(kw, device)
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        emb_device = model.get_input_embeddings().weight.device
        for w in windows:
            try:
                model(w.unsqueeze(0).to(emb_device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer, (fwd, own) in zip(layers, originals):
            if own:
                layer.forward = fwd
            else:
                del layer.forward   # back to the class method
    return torch.cat(inputs), [k or {} for k in kwargs]


def _linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.inference_mode()
def _stages(layer: torch.nn.Module, names: list[str], x: torch.Tensor, kw: dict) -> list[list[str]]:
    """Modules grouped by shared input, in the order the forward calls them (one sample)."""
    linears = _linears(layer)
    calls: list[tuple[str, torch.Tensor]] = []   # holding the inputs keeps their identity unambiguous

    def record(name: str):
        def pre(mod, args):
            if all(name != n for n, _ in calls):
                calls.append((name, args[0]))
        return pre

    hooks = [linears[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        layer(x, **kw)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    last = None
    for n, inp in calls:
        if stages and inp is last:
            stages[-1].append(n)
        else:
            stages.append([n])
        last = inp
    seen = {n for n, _ in calls}
    missing = [n for n in names if n not in seen]
    return stages + ([missing] if missing else [])


class _Replay:
    """Outputs of the layer's finished sub-blocks (direct children such as `self_attn` whose quantized
    Linears are all done), recorded on one pass over the windows and returned on later passes."""

    def __init__(self, layer: torch.nn.Module, names: list[str], n: int) -> None:
        self.layer, self.n, self.index = layer, n, 0
        self.pending: dict[str, set[str]] = {}     # child -> its Linears not yet quantized
        for name in names:
            child, _, rest = name.partition(".")
            if rest:
                self.pending.setdefault(child, set()).add(name)
        self.recording: dict[str, list] = {}
        self.ready: dict[str, list] = {}
        self.invalid: set[str] = set()

    def quantized(self, stage: list[str]) -> None:
        """The stage's Linears are final: children with nothing left to quantize record on the next pass."""
        for child, left in self.pending.items():
            left.difference_update(stage)
            if not left and child not in self.ready and child not in self.invalid:
                self.recording.setdefault(child, [None] * self.n)

    def stop_recording(self) -> None:
        """Nothing runs after the next pass: recording it would only cost memory."""
        self.recording.clear()

    def _recorder(self, child: str, forward: Callable) -> Callable:
        def record(*args, **kwargs):
            out = forward(*args, **kwargs)
            slots = self.recording[child]
            # a tensor, or a tuple of one tensor and Nones (attention weights are not kept); a
            # child called twice per window cannot be replayed
            plain = isinstance(out, torch.Tensor) or (
                isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor)
                and all(o is None for o in out[1:]))
            if not plain or slots[self.index] is not None:
                self.invalid.add(child)
            else:
                slots[self.index] = out
            return out
        return record

    def _player(self, child: str) -> Callable:
        outputs = self.ready[child]

        def play(*args, **kwargs):   # a copy, in case the layer adds to it in place
            out = outputs[self.index]
            return out.clone() if isinstance(out, torch.Tensor) else (out[0].clone(), *out[1:])
        return play

    @contextmanager
    def active(self) -> Iterator[None]:
        patched = []
        for child in list(self.recording) + list(self.ready):
            mod = self.layer.get_submodule(child)
            patched.append((mod, "forward" in mod.__dict__, mod.forward))
            mod.forward = self._recorder(child, mod.forward) if child in self.recording else self._player(child)
        try:
            yield
        finally:
            for mod, own, forward in patched:
                if own:
                    mod.forward = forward
                else:
                    del mod.forward     # back to the class method
            for child, slots in self.recording.items():
                if child not in self.invalid and all(o is not None for o in slots):
                    self.ready[child] = slots
                else:
                    self.invalid.add(child)
            self.recording.clear()


@torch.inference_mode()
def _collect(layer: torch.nn.Module, stage: list[str], inputs: torch.Tensor, kw: dict, cut_short: bool,
             replay: _Replay) -> dict[str, torch.Tensor]:
    """H for each module of the stage (modules fed the same tensor share one accumulator)."""
    linears = _linears(layer)
    accs: dict[str, HessianAccumulator] = {}
    owner: dict[str, str] = {}     # module -> module whose accumulator it shares (decided on sample 0)
    state: dict[str, Any] = {"last": None, "done": set()}

    def hook(name: str):
        def pre(mod, args):
            x = args[0]
            last = state["last"]   # (input tensor, its owner); the reference keeps identity unambiguous
            if name not in owner:   # consecutive calls on the same tensor share one H (q/k/v, gate/up)
                owner[name] = last[1] if last is not None and last[0] is x else name
            if owner[name] == name:
                if name not in accs:
                    accs[name] = HessianAccumulator(x.shape[-1], x.device)
                accs[name].add(x)
            state["last"] = (x, owner[name])
            state["done"].add(name)
            if cut_short and len(state["done"]) == len(stage):
                raise _Stop
        return pre

    hooks = [linears[n].register_forward_pre_hook(hook(n)) for n in stage]
    try:
        with replay.active():
            for j in range(len(inputs)):
                state["last"], state["done"], replay.index = None, set(), j
                try:
                    layer(inputs[j: j + 1], **kw)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: accs[owner[n]].h for n in stage if n in owner}


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm between the decoder stack and the output head: `norm` beside the stack (LLaMA, Qwen2,
    Gemma3 and most decoders keep it there)."""
    prefix, _ = decoder_layers(model)
    parent = model.get_submodule(prefix.rpartition(".")[0])
    norm = getattr(parent, "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


@torch.inference_mode()
def quantize_head(model: torch.nn.Module, name: str, solve: Solver, hidden: torch.Tensor | None,
                  device: torch.device) -> Quantized:
    """Quantize the output head `name` on the final norm of the last layer's outputs `hidden` (None:
    round-to-nearest). The weight is left as it was (see the module docstring)."""
    head = model.get_submodule(name)
    home = head.weight.device
    h = None
    t0 = time.perf_counter()
    head.to(device)
    if hidden is not None:
        norm = final_norm(model)
        norm_home = next(norm.parameters()).device
        norm.to(device)
        acc = HessianAccumulator(head.in_features, device)
        for j in range(len(hidden)):
            acc.add(norm(hidden[j: j + 1]))
        norm.to(norm_home)
        h = acc.h
    try:
        result = solve(name, head, h)
    finally:
        head.to(home)
    return Quantized(name, None, result, time.perf_counter() - t0)


@torch.inference_mode()
def quantize_layers(model: torch.nn.Module, solve: Solver, *, windows: torch.Tensor | None,
                    device: torch.device, skip: list[str], true_sequential: bool = True,
                    head: str | None = None, progress: Progress = SILENT) -> list[Quantized]:
    """Quantize every Linear inside the decoder layers (not matching `skip`) in place, replacing its
    weight by the dequantized result, then the output head `head` when given (last in the list).
    `windows` None: no calibration (round-to-nearest)."""
    prefix, layers = decoder_layers(model)
    inputs, kwargs = (None, None)
    if windows is not None:
        progress.start(f"Capturing inputs of {len(windows)} calibration windows", total=None)
        inputs, kwargs = capture_inputs(model, windows, device)
        progress.finish()
    done: list[Quantized] = []
    progress.start("Quantizing layers", total=len(layers))
    for i, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        linears = _linears(layer)
        names = [n for n in linears if not skip_matches(f"{prefix}.{i}.{n}", skip)]
        if inputs is None:
            stages = [names]
        elif true_sequential:
            stages = _stages(layer, names, inputs[0:1], kwargs[i])
        else:
            stages = [names]
        last = None
        replay = _Replay(layer, names, len(inputs)) if inputs is not None else None
        for stage in stages:
            hessians = _collect(layer, stage, inputs, kwargs[i], True, replay) if inputs is not None else {}
            for n in stage:
                lin = linears[n]
                full = f"{prefix}.{i}.{n}"
                t0 = time.perf_counter()
                h = hessians.get(n)
                if inputs is not None and h is None:     # never called in the forward: nothing to fit
                    continue
                result = solve(full, lin, h)
                lin.weight.data = result.dequantize(lin.weight.dtype).to(lin.weight.device)
                last = Quantized(full, i, result, time.perf_counter() - t0)
                done.append(last)
            hessians.clear()
            if replay is not None:
                replay.quantized(stage)
        if replay is not None:
            replay.stop_recording()
            with replay.active():
                for j in range(len(inputs)):
                    replay.index = j
                    inputs[j] = _hidden(layer(inputs[j: j + 1], **kwargs[i]))[0]
            del replay
        layer.to(home)
        info = {"module": last.name.rsplit(".", 2)[-2] + "." + last.name.rsplit(".", 1)[-1], "err": last.result.error} \
            if last else {}
        progress.advance(1, layer=i, **info)
    progress.finish()
    if head is not None:
        progress.start(f"Quantizing {head}", total=None)
        done.append(quantize_head(model, head, solve, inputs, device))
        progress.finish()
    return done
