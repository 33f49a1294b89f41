"""Recipes: one YAML file that chains prune -> distill -> quantize -> bench, resumable.

A recipe is not a second interface: each step's options are the fields of the command's own
options dataclass (`PruneOptions`, `DistillOptions`, `QuantizeOptions`, `BenchOptions`), built
and validated by the same code the CLI uses, and the step runs through the same function.
Everything is checked (keys, types, references, each dataclass's `validate()`) before the first
step starts, so a typo in step 3 does not cost the hour spent in step 2.

    model: smollm2-135m          # the base model
    out: out/smollm2             # each step writes OUT/<step name> unless it sets `output`
    data_dir: null               # optional: default --data-dir of every step that has one
    steps:
      - prune: {ratio: 0.2}
      - distill: {steps: 300}    # student = previous output, teacher = base
      - quantize: {bits: 4}
      - bench: {}                # models = base + every stage output, baseline = base

Step names are plain names (they become OUT/<name>), and no output may be `out` itself, contain it,
nest with another step's output, or replace an input, the recipe or the current folder; every
output that will be written is probed for writability before step 1.

Resume: a step whose output exists, whose recorded `parameters` (its llmopt.json) equal the planned
ones and whose recorded input fingerprints (`recipe_inputs`, added by the runner after the step)
match its inputs now is skipped. It reruns, over its own output, when a step it reads from runs
again, when an input changed, or when no fingerprint was recorded. An existing output with other
parameters (or not written by llmopt) is never overwritten: the plan stops before anything runs and
asks for `--force`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
import re
import time
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from llmopt import checkpoint
from llmopt.checkpoint import PROVENANCE, _jsonable, atomic_output, provenance, read_provenance, write_provenance
from llmopt.errors import UserError
from llmopt.progress import SILENT, Progress

TOP_LEVEL_KEYS = ("model", "out", "data_dir", "device", "dtype", "steps")
# Top-level keys that become the default of the same-named option of every step that has it.
SHARED_DEFAULTS = ("data_dir", "device", "dtype")
BASE = "base"
# Options whose value names a model: there `base` and step names are references to outputs.
MODEL_FIELDS = ("model", "student", "teacher", "models", "baseline")
# Recorded parameters that do not change what a step produces.
IGNORED_PARAMETERS = ("force", "output")
BENCH_REPORT = "report.json"
# A step name is its output folder OUT/<name> and a --set prefix: no separators, dots or spaces.
PLAIN_NAME = re.compile(r"\w[\w-]*")
# The llmopt.json key where the runner records the fingerprints of what a finished step read.
INPUTS_KEY = "recipe_inputs"
# The files of a model directory that decide what a step makes of it: config, weights, tokenizer.
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".gguf")


@dataclass(frozen=True)
class StepKind:
    """How a step name maps to the command's options class and function (imported lazily)."""

    name: str
    module: str
    options: str
    function: str
    input: str               # the option that receives the previous stage's output
    stage: str | None        # label of the model it produces; None for steps that only measure

    def load(self) -> tuple[type, Any]:
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name and (self.module == e.name or self.module.startswith(e.name + ".")):
                raise UserError(f"step '{self.name}' needs {self.module}, which this llmopt installation "
                                f"does not have", hint="install a complete llmopt release") from e
            raise
        try:
            return getattr(module, self.options), getattr(module, self.function)
        except AttributeError as e:
            raise UserError(f"step '{self.name}': {self.module} has no {e.name}",
                            hint="install a complete llmopt release") from e


STEP_KINDS: dict[str, StepKind] = {
    "prune": StepKind("prune", "llmopt.prune", "PruneOptions", "prune", "model", "pruned"),
    "distill": StepKind("distill", "llmopt.distill", "DistillOptions", "distill", "student", "distilled"),
    "quantize": StepKind("quantize", "llmopt.quantize", "QuantizeOptions", "quantize", "model", "quantized"),
    "bench": StepKind("bench", "llmopt.bench.run", "BenchOptions", "bench", "models", None),
}


@dataclass
class Step:
    index: int                # 1-based, as shown in the plan and accepted by --set steps.N.key
    name: str
    kind: StepKind
    written: dict             # the options as written in the recipe (after --set)
    options: Any = None       # the command's options dataclass, fully resolved
    output: Path | None = None
    label: str | None = None  # the stage this step produces (row in the final table)
    inputs: list[str] = field(default_factory=list)   # step names whose outputs this step reads
    status: str = "run"       # run | skip
    reason: str = ""
    overwrite: bool = False   # rerun over our own earlier output whose input is being rebuilt

    @property
    def where(self) -> str:
        return f"step {self.index} ({self.name})"


@dataclass
class Recipe:
    path: Path
    model: str
    out: Path
    steps: list[Step]
    force: bool = False
    overrides: list[str] = field(default_factory=list)

    def stages(self) -> list[tuple[str, str]]:
        """(label, model) for the base model and every step that produces one, in order."""
        rows = [(BASE, self.model)]
        rows += [(s.label, str(s.output)) for s in self.steps if s.label]
        return rows

    def describe_inputs(self, step: Step) -> str:
        """The models a step reads, as `base` / step names where they are ones: "student prune, teacher base"."""
        names = {str(s.output): s.name for s in self.steps}
        names[self.model] = BASE
        known = _field_names(type(step.options))
        parts = []
        for key in ([step.kind.input] + [k for k in MODEL_FIELDS if k != step.kind.input]):
            if key not in known or getattr(step.options, key) in (None, []):
                continue
            value = getattr(step.options, key)
            values = value if isinstance(value, list) else [value]
            text = ", ".join(names.get(str(v), str(v)) for v in values)
            parts.append(text if key == step.kind.input else f"{key} {text}")
        return "; ".join(parts)

    def plan_dict(self) -> dict:
        return {
            "recipe": str(self.path), "model": self.model, "out": str(self.out), "force": self.force,
            "overrides": self.overrides,
            "steps": [{"index": s.index, "name": s.name, "kind": s.kind.name, "status": s.status,
                       "reason": s.reason, "input": _input_of(s), "reads": self.describe_inputs(s),
                       "output": str(s.output),
                       "stage": s.label, "options": _jsonable(s.options)} for s in self.steps],
        }


def _input_of(step: Step) -> Any:
    return getattr(step.options, step.kind.input, None)


# --------------------------------------------------------------------------- reading and --set

def read_recipe(path: str | Path) -> dict:
    """The recipe file as a dict (YAML; JSON is YAML too)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"recipe {p} does not exist", hint="pass the path of a .yaml recipe, e.g. recipes/*.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise UserError(f"{p}: a recipe is a mapping with model, out and steps",
                        hint="see docs/recipes.md")
    return data


def parse_value(text: str) -> Any:
    """A --set value, read as YAML so numbers, booleans, null and [lists] keep their type."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply `--set key=value`: top-level keys, `steps.N.key` (N from 1) and `STEPNAME.key`."""
    data = json.loads(json.dumps(data, default=str))   # a deep copy we may change
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value", hint="e.g. --set out=/scratch/run1 "
                                                                       "or --set prune.ratio=0.3")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        parsed = parse_value(value)
        if len(parts) == 1:
            if key not in TOP_LEVEL_KEYS or key == "steps":
                raise UserError(f"--set {key}: unknown top-level key", hint=_suggest(key, TOP_LEVEL_KEYS[:-1])
                                or f"top-level keys are {', '.join(TOP_LEVEL_KEYS[:-1])}; for a step use "
                                   "STEP.key or steps.N.key")
            data[key] = parsed
            continue
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise UserError(f"--set {key}: {source} has no steps list")
        if parts[0] == "steps":
            if len(parts) != 3 or not parts[1].isdigit():
                raise UserError(f"--set {key}: expected steps.N.key with N a step number from 1")
            n = int(parts[1])
            if not 1 <= n <= len(steps):
                raise UserError(f"--set {key}: {source} has steps 1 to {len(steps)}")
            entry, option = steps[n - 1], parts[2]
        else:
            if len(parts) != 2:
                raise UserError(f"--set {key}: expected STEP.key, steps.N.key or a top-level key")
            entry, option = _entry_by_name(steps, parts[0], key, source), parts[1]
        if not isinstance(entry, dict):
            raise UserError(f"--set {key}: that step of {source} is not a mapping")
        if option == "name":
            entry["name"] = parsed
            continue
        kind = _kind_key(entry, f"{source}: --set {key}")
        if entry[kind] is None:
            entry[kind] = {}
        if not isinstance(entry[kind], dict):
            raise UserError(f"--set {key}: the options of that {kind} step are not a mapping")
        entry[kind][option] = parsed
    return data


def _entry_by_name(steps: list, name: str, key: str, source: str) -> dict:
    names = _step_names(steps)
    matches = [e for e, n in zip(steps, names) if n == name]
    if not matches:   # a kind that occurs once also names its step
        kinds = [e for e in steps if isinstance(e, dict) and name in e]
        if len(kinds) == 1:
            matches = kinds
    if len(matches) != 1:
        hint = f"step names in {source}: {', '.join(str(n) for n in names if n)}; or use steps.N.key"
        raise UserError(f"--set {key}: no step named '{name}'", hint=hint)
    return matches[0]


def _kind_key(entry: dict, where: str) -> str:
    kinds = [k for k in entry if k != "name"]
    if len(kinds) != 1:
        what = "no step kind" if not kinds else f"several keys ({', '.join(map(str, kinds))})"
        raise UserError(f"{where}: {what}; a step is one of {', '.join(STEP_KINDS)} with its options, "
                        "plus an optional name", hint="e.g. - prune: {ratio: 0.2}")
    kind = kinds[0]
    if kind not in STEP_KINDS:
        raise UserError(f"{where}: unknown step '{kind}'",
                        hint=_suggest(str(kind), STEP_KINDS) or f"steps are {', '.join(STEP_KINDS)}")
    return kind


def _step_names(steps: list) -> list[Any]:
    """Each step's name: its `name` as written (checked later), else its kind, with -2, -3 ... for repeats."""
    names: list[Any] = []
    seen: dict[str, int] = {}
    for entry in steps:
        if not isinstance(entry, dict):
            names.append(None)
            continue
        kinds = [k for k in entry if k != "name"]
        if "name" in entry:
            names.append(entry["name"])
            continue
        kind = str(kinds[0]) if len(kinds) == 1 else None
        if kind is None:
            names.append(None)
            continue
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}-{seen[kind]}")
    return names


def _suggest(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else None


# --------------------------------------------------------------------------- options from YAML

def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check a YAML value against a dataclass field annotation; (ok, value converted where lossless)."""
    if annotation is Any or annotation is None:
        return True, value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for arg in (a for a in args if a is not type(None)):
            ok, out = coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]   # one value = a list of one
        if value is None:
            return False, value
        inner = args[0] if args else Any
        out = []
        for item in items:
            ok, conv = coerce(item, inner)
            if not ok:
                return False, value
            out.append(conv)
        return True, (tuple(out) if origin is tuple or annotation is tuple else out)
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):   # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)   # `split: 0.5` means what `--split 0.5` means
        return isinstance(value, str), value
    if annotation is Path:
        return isinstance(value, (str, Path)), str(value) if isinstance(value, Path) else value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value


def build_options(cls: type, values: dict, where: str) -> Any:
    """Construct `cls(**values)` after checking every key and type; errors name `where` and the key."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            hint = _suggest(str(key), known) or f"{cls.__name__} options: {', '.join(known)}"
            raise UserError(f"{where}: unknown option '{key}'", hint=hint)
        ok, conv = coerce(value, hints.get(key, Any))
        if not ok:
            raise UserError(f"{where}: option '{key}' must be {_type_name(hints.get(key))}, "
                            f"got {value!r} ({_type_name(type(value))})")
        kwargs[key] = conv
    missing = [f.name for f in fields(cls) if f.init and f.name not in kwargs
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UserError(f"{where}: missing option '{missing[0]}'", hint=f"add {missing[0]}: ... to the step")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from e


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


# --------------------------------------------------------------------------- planning

def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), force: bool = False) -> Recipe:
    """Read, override, resolve and validate a recipe, and decide which steps run. Runs nothing."""
    from llmopt.models import resolve

    path = Path(path)
    src = str(path)
    data = apply_overrides(read_recipe(path), list(overrides), src)
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise UserError(f"{src}: unknown key '{unknown[0]}'",
                        hint=_suggest(str(unknown[0]), TOP_LEVEL_KEYS) or f"keys are {', '.join(TOP_LEVEL_KEYS)}")
    model = data.get("model")
    if not model or not isinstance(model, str):
        raise UserError(f"{src}: no model", hint="add model: DIR | hub id | alias, or pass --set model=...")
    try:
        resolve(model)   # a missing directory or an unknown alias fails here, before any step
    except UserError as e:
        raise UserError(f"{src}: {e.args[0]}", hint=e.hint) from e
    out = data.get("out")
    if not out or not isinstance(out, str):
        raise UserError(f"{src}: no out directory", hint="add out: DIR, or pass --set out=DIR")
    for key in SHARED_DEFAULTS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise UserError(f"{src}: {key} must be a string, got {data[key]!r}")
    entries = data.get("steps")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{src}: no steps", hint="add steps: a list of prune / distill / quantize / bench")

    names = _step_names(entries)
    steps: list[Step] = []
    for i, (entry, name) in enumerate(zip(entries, names), start=1):
        where = f"{src}: step {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: a step is a mapping like '- quantize: {{bits: 4}}', got {entry!r}")
        kind = STEP_KINDS[_kind_key(entry, where)]
        written = entry[kind.name] if entry[kind.name] is not None else {}
        if not isinstance(written, dict):
            raise UserError(f"{where} ({name}): the options of {kind.name} must be a mapping, got {written!r}")
        _check_name(name, [s.name for s in steps], where)
        steps.append(Step(index=i, name=name, kind=kind, written=dict(written)))

    recipe = Recipe(path=path, model=model, out=Path(out).expanduser(), steps=steps, force=force,
                    overrides=list(overrides))
    _resolve_steps(recipe, data, src)
    _check_outputs(recipe, src)
    _decide(recipe)
    for step in recipe.steps:
        if step.status == "run":   # a read-only or missing place fails now, not after the steps before it
            try:
                checkpoint.check_writable(step.output)
            except UserError as e:
                raise UserError(f"{src}: {step.where}: {e.args[0]}", hint=e.hint) from e
    return recipe


def _check_name(name: Any, taken: list[str], where: str) -> None:
    """A step name becomes OUT/<name>: "", "..", "a/b" or "/x" would put the output elsewhere."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise UserError(f"{where}: step name {name!r} must be a plain name (letters, digits, '_' and '-', "
                        "not starting with '-'): it names the output folder OUT/<name>",
                        hint="e.g. name: quantize-4bit; to write elsewhere set the step's output option")
    if name == BASE or name in taken:
        raise UserError(f"{where}: step name '{name}' is " + ("reserved" if name == BASE else "repeated"),
                        hint="give each step a unique plain name")


def _resolve_steps(recipe: Recipe, data: dict, src: str) -> None:
    """Fill in each step's defaults (input, output, teacher, bench models), build and validate its options."""
    produced: dict[str, Step] = {}
    previous: str = recipe.model
    labels_seen: dict[str, int] = {}
    for step in recipe.steps:
        where = f"{src}: {step.where}"
        cls, _ = step.kind.load()
        known = _field_names(cls)
        values = _written_values(step, known, data, where)
        for key in MODEL_FIELDS:
            if key in values and key in known:
                values[key] = _model_ref(values[key], key, step, recipe, produced, where)
        _default_inputs(step, values, known, recipe, produced, previous)
        _place_output(step, values, known, recipe, where)

        step.options = build_options(cls, values, where)
        try:
            _as_if_inputs_exist(step.options, produced, recipe.model).validate()
        except UserError as e:
            raise UserError(f"{where}: {e.args[0]}", hint=e.hint) from e

        if step.kind.stage:
            step.label = _stage_label(step, labels_seen)
            produced[step.name] = step
            previous = str(step.output)


def _written_values(step: Step, known: set[str], data: dict, where: str) -> dict:
    """The step's options as written, plus the recipe-wide data_dir, device and dtype where it does not set them."""
    values = dict(step.written)
    for key in ("force",):
        if key in values:
            raise UserError(f"{where}: option '{key}' is not set in a recipe", hint="pass llmopt run --force")
    for key in SHARED_DEFAULTS:
        if key in known and key not in values and data.get(key) is not None:
            values[key] = data[key]
    return values


def _model_ref(value: Any, key: str, step: Step, recipe: Recipe, produced: dict[str, Step], where: str) -> Any:
    """`base` and earlier step names stand for their models; anything else must resolve now."""
    from llmopt.models import resolve

    if isinstance(value, list):
        return [_model_ref(v, key, step, recipe, produced, where) for v in value]
    if not isinstance(value, str):
        return value
    if value == BASE:
        return recipe.model
    if value in produced:
        step.inputs.append(value)
        return str(produced[value].output)
    later = [s for s in recipe.steps if s.name == value]
    if later:
        raise UserError(f"{where}: option '{key}' refers to step '{value}', which does not come "
                        f"before it or produces no model")
    try:
        resolve(value)   # a path that does not exist, or an unknown alias
    except UserError as e:
        raise UserError(f"{where}: option '{key}': {e.args[0]}", hint=e.hint) from e
    return value


def _default_inputs(step: Step, values: dict, known: set[str], recipe: Recipe, produced: dict[str, Step],
                    previous: str) -> None:
    """Unset inputs chain the steps: the previous stage's model (bench: every stage so far, the base as
    baseline), and the base model as a distill step's teacher."""
    if step.kind.input == "models":
        if "models" not in values:
            values["models"] = [str(s.output) for s in produced.values()] or [recipe.model]
            step.inputs += list(produced)
        if "baseline" in known and "baseline" not in values:
            values["baseline"] = recipe.model
        if values.get("baseline") and len(values["models"]) > 1:   # the baseline is its own row
            values["models"] = [m for m in values["models"] if m != values["baseline"]]
    elif step.kind.input not in values:
        values[step.kind.input] = previous
        if previous != recipe.model:
            step.inputs.append(next(s.name for s in produced.values() if str(s.output) == previous))
    if step.kind.name == "distill" and "teacher" in known and "teacher" not in values:
        values["teacher"] = recipe.model


def _place_output(step: Step, values: dict, known: set[str], recipe: Recipe, where: str) -> None:
    """OUT/<name> unless the step sets its own output; --force of `llmopt run` applies to every step."""
    if "output" in values:
        if not isinstance(values["output"], str) or not values["output"]:
            raise UserError(f"{where}: option 'output' must be a directory path")
        step.output = Path(values["output"]).expanduser()
    else:
        step.output = recipe.out / step.name
    if "output" in known:
        values["output"] = str(step.output)
    if "force" in known:
        values["force"] = recipe.force


def _stage_label(step: Step, labels_seen: dict[str, int]) -> str:
    """The row name in the final table: the stage ("pruned", ...) for the first step of a kind left
    under its default name, else the step's own name."""
    n = labels_seen[step.kind.stage] = labels_seen.get(step.kind.stage, 0) + 1
    default_name = step.kind.name if n == 1 else f"{step.kind.name}-{n}"
    return step.kind.stage if step.name == default_name and n == 1 else step.name


def _as_if_inputs_exist(options: Any, produced: dict[str, Step], base: str) -> Any:
    """A copy for validate(): outputs of earlier steps may not exist yet, so the base model stands in."""
    pending = {str(s.output) for s in produced.values() if not s.output.exists()}
    if not pending:
        return options

    def swap(v: Any) -> Any:
        if isinstance(v, list):
            return [swap(x) for x in v]
        return base if isinstance(v, str) and v in pending else v

    names = _field_names(type(options))
    return replace(options, **{k: swap(getattr(options, k)) for k in MODEL_FIELDS if k in names})


def _real(path: str | Path) -> Path:
    """An absolute path with `..` and symlinks worked out, whether or not it exists."""
    return Path(path).expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


def _guarded(recipe: Recipe) -> list[tuple[Path, str]]:
    """What no output may replace: the recipe, the current folder and every existing path a step reads."""
    outputs = {_real(s.output) for s in recipe.steps}
    guarded = [(_real(recipe.path), f"the recipe {recipe.path}"), (Path.cwd().resolve(), "the current folder"),
               (_real(recipe.model), f"the base model {recipe.model}")]
    for step in recipe.steps:
        for key, value in _jsonable(step.options).items():
            for v in value if isinstance(value, list) else [value]:
                if key != "output" and isinstance(v, str) and v.strip() and Path(v).expanduser().exists() \
                        and _real(v) not in outputs:
                    guarded.append((_real(v), f"{v}, which {step.where} reads as {key}"))
    return guarded


def _check_outputs(recipe: Recipe, src: str) -> None:
    """Each output is a folder of its own inside nothing it could destroy: replacing it (on rerun or
    --force) must never take `out`, another step's output, an input, the recipe or the current folder."""
    top = _real(recipe.out)
    guarded = _guarded(recipe)
    done: list[tuple[Step, Path]] = []
    hint = "give the step its own output, e.g. remove its output option to write OUT/<step name>"
    for step in recipe.steps:
        path = _real(step.output)
        where = f"{src}: {step.where}: output {step.output}"
        if path == top or _inside(top, path):
            what = "is the recipe's out folder" if path == top else f"contains the recipe's out {recipe.out}"
            raise UserError(f"{where} {what}; a step writes one folder inside it", hint=hint)
        for other, other_path in done:
            if path == other_path:
                raise UserError(f"{src}: two steps write to {step.output}: {other.where} and {step.where}",
                                hint="give them different names or outputs")
            if _inside(other_path, path) or _inside(path, other_path):
                how = "contains" if _inside(other_path, path) else "is inside"
                raise UserError(f"{where} {how} {other.where}'s output {other.output}", hint=hint)
        for guard, what in guarded:
            if path == guard or _inside(guard, path):
                raise UserError(f"{where} would replace {what}", hint=hint)
        done.append((step, path))


def planned_parameters(step: Step) -> dict:
    params = _jsonable(step.options)
    return {k: v for k, v in params.items() if k not in IGNORED_PARAMETERS}


def parameter_differences(step: Step) -> list[str] | None:
    """None when the output holds what this step would write; else what differs (empty: unknown origin)."""
    record = read_provenance(step.output) if step.output.is_dir() else None
    if record is None or not isinstance(record.get("parameters"), dict):
        return []
    recorded = record["parameters"]
    defaults = _defaults(type(step.options))
    diffs = []
    for key, value in planned_parameters(step).items():
        if key not in recorded:
            # An option added in a later llmopt release, left at its default, does what older ones did.
            if key not in defaults or _jsonable(defaults[key]) != value:
                diffs.append(f"{key} not recorded")
        elif recorded[key] != value:
            diffs.append(f"{key} {recorded[key]!r} -> {value!r}")
    return diffs or None


def _model_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in MODEL_SUFFIXES
                  and f.name != PROVENANCE and not f.name.startswith("."))


_FINGERPRINTS: dict[tuple, str] = {}   # stat signature -> fingerprint, for files unchanged since hashed


def fingerprint(spec: str) -> str:
    """sha256 over a local model's config, weight and tokenizer files (names, sizes, contents): what a
    step consumed. A hub id or alias is its name. About 1 s per GB; unchanged files are hashed once
    per process (a file modified in the last 2 s is hashed every time: its timestamp cannot tell)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return f"name:{spec}"
    stats = [(f, f.stat()) for f in _model_files(path)]
    key = tuple((str(f.absolute()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for f, st in stats)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    total = hashlib.sha256()
    for f, st in stats:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        total.update(f"{f.name}\0{st.st_size}\0{h.hexdigest()}\n".encode())
    digest = "sha256:" + total.hexdigest()
    if stats and time.time_ns() - max(st.st_mtime_ns for _, st in stats) > 2_000_000_000:
        _FINGERPRINTS[key] = digest
    return digest


def input_fingerprints(step: Step) -> list[dict]:
    """[{option, model, fingerprint}] for every model the step reads, in option order."""
    names = _field_names(type(step.options))
    out = []
    for key in (k for k in MODEL_FIELDS if k in names):
        value = getattr(step.options, key)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                out.append({"option": key, "model": str(v), "fingerprint": fingerprint(str(v))})
    return out


def input_changes(recipe: Recipe, step: Step) -> str | None:
    """None when the output records the same input fingerprints as the inputs have now; else the reason to rerun."""
    recorded = (read_provenance(step.output) or {}).get(INPUTS_KEY)
    if not isinstance(recorded, list):
        return "no input fingerprint recorded, so rerun rather than trust it was made from these inputs"
    before = {(r.get("option"), r.get("model")): r.get("fingerprint") for r in recorded if isinstance(r, dict)}
    now = input_fingerprints(step)
    changed = [r["model"] for r in now if before.get((r["option"], r["model"])) != r["fingerprint"]]
    if not changed and len(before) == len(now):
        return None
    names = {str(s.output): s.name for s in recipe.steps}
    names[recipe.model] = BASE
    return f"input changed ({', '.join(dict.fromkeys(names.get(m, m) for m in changed)) or 'models read'})"


def _record_inputs(output: Path, consumed: list[dict]) -> None:
    """Add what the step read to its llmopt.json (replaced atomically: an interruption leaves no record,
    and an output without one is rerun)."""
    record = read_provenance(output)
    if record is None:
        return
    record[INPUTS_KEY] = consumed
    tmp = output / f".{PROVENANCE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, output / PROVENANCE)


def _check_replaceable(recipe: Recipe, step: Step) -> None:
    """--force replaces only an earlier llmopt output or an empty folder (as every command's own check
    does when the step starts): refuse anything else now, before the steps ahead of it run."""
    path = step.output
    if os.path.lexists(path) and not (path.is_dir() and ((path / PROVENANCE).is_file() or not any(path.iterdir()))):
        raise UserError(f"{recipe.path}: {step.where}: {path} exists and is not an earlier llmopt output, "
                        "which is all --force replaces", hint="move it away, or choose another out or output")


def _decide(recipe: Recipe) -> None:
    """Mark each step run or skip; refuse (before anything runs) to overwrite a foreign or changed output."""
    running: set[str] = set()
    for step in recipe.steps:
        if recipe.force:
            _check_replaceable(recipe, step)
            step.status, step.reason = "run", "--force" if step.output.exists() else "new"
        elif not step.output.exists():
            step.status, step.reason = "run", "new"
        else:
            diffs = parameter_differences(step)
            if diffs is not None:
                why = "its parameters differ: " + "; ".join(diffs[:4]) if diffs \
                    else "it was not written by this step (no matching llmopt.json)"
                raise UserError(f"{recipe.path}: {step.where}: {step.output} exists but {why}",
                                hint="pass --force to rerun every step, or remove that directory")
            stale = [n for n in step.inputs if n in running]
            changed = None if stale else input_changes(recipe, step)
            if stale:   # our own earlier result, built from an input that is being rebuilt
                step.status, step.reason = "run", f"input rebuilt ({', '.join(stale)})"
            elif changed:   # our own earlier result, built from other inputs than the ones there now
                step.status, step.reason = "run", changed
            else:
                step.status, step.reason = "skip", "done"
            step.overwrite = step.status == "run"
        if step.status == "run":
            running.add(step.name)


# --------------------------------------------------------------------------- running

def run(recipe: Recipe, progress: Progress = SILENT, on_step=None) -> dict:
    """Run the planned steps in order; returns the plan with each step's summary and the bench report."""
    results: dict[str, dict] = {}
    report: dict | None = None
    for step in recipe.steps:
        if on_step is not None:
            on_step(step)
        if step.status == "skip":
            summary = _recorded_summary(step)
        else:
            _, func = step.kind.load()
            overwrite = recipe.force or step.overwrite
            opts = replace(step.options, force=True) if overwrite and hasattr(step.options, "force") \
                else step.options
            consumed = input_fingerprints(step)
            summary = _run_step(step, func, opts, recipe, progress)
            if isinstance(summary, dict) and summary.get("stopped") == "interrupted":
                # distill keeps its best-so-far on an interrupt; unrecorded, resume reruns it, and
                # no later step may build on a half-finished model.
                raise KeyboardInterrupt
            _record_inputs(step.output, consumed)
        results[step.name] = summary
        if step.kind.name == "bench":
            report = summary
    plan = recipe.plan_dict()
    for entry in plan["steps"]:
        entry["summary"] = results.get(entry["name"])
    plan["stages"] = stage_rows(recipe, report)
    plan["report"] = report
    return plan


def stage_rows(recipe: Recipe, report: dict | None) -> list[dict]:
    """One row per stage (base, pruned, ...) with the bench figures and deltas vs the base, if measured."""
    measured = {r.get("name"): r for r in (report or {}).get("models", []) if isinstance(r, dict)}
    step_of = {str(s.output): s.name for s in recipe.steps}
    rows = []
    for label, model in recipe.stages():
        r = measured.get(model, {})
        rows.append({"stage": label, "model": model, "step": step_of.get(model),
                     "metrics": r.get("metrics"), "deltas": r.get("deltas")})
    return rows


def _run_step(step: Step, func, opts: Any, recipe: Recipe, progress: Progress) -> dict:
    import time

    started = time.time()
    summary = func(opts, progress)
    if "output" not in _field_names(type(opts)):
        # A measuring step writes no model; keep its report where resume can find it.
        with atomic_output(step.output, force=True) as tmp:
            (tmp / BENCH_REPORT).write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
            write_provenance(tmp, provenance(step.kind.name, recipe.model, opts, started))
    return summary if isinstance(summary, dict) else {"result": summary}


def _recorded_summary(step: Step) -> dict:
    report = step.output / BENCH_REPORT
    if report.is_file():
        return json.loads(report.read_text())
    record = read_provenance(step.output) or {}
    return {"skipped": True, "output": str(step.output), "metrics": record.get("metrics", {})}


__all__ = ["STEP_KINDS", "Recipe", "Step", "StepKind", "apply_overrides", "build_options", "coerce", "load",
           "read_recipe", "run"]
