"""Recipes: parsing, validation before anything runs, --set, dry-run plans, resume, and real runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmopt import recipes
from llmopt.checkpoint import atomic_output, provenance, write_provenance
from llmopt.errors import UserError, require
from llmopt.recipes import StepKind

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


# --------------------------------------------------------------------------- a fast stand-in step

@dataclass
class CopyOptions:
    model: str
    output: str
    scale: float = 1.0
    tags: list[str] = field(default_factory=list)
    force: bool = False

    def validate(self) -> None:
        require(self.scale > 0, f"--scale must be positive, got {self.scale}")


CALLS: list[CopyOptions] = []


def copy_step(opts: CopyOptions, progress=None) -> dict:
    """Copies its input directory and records provenance, like every real step does."""
    opts.validate()
    CALLS.append(opts)
    started = time.time()
    with atomic_output(opts.output, opts.force) as tmp:
        src = Path(opts.model)
        if src.is_dir():
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        write_provenance(tmp, provenance("copy", opts.model, opts, started))
    return {"output": opts.output, "scale": opts.scale}


class CopyKind(StepKind):
    def load(self):
        return CopyOptions, copy_step


@pytest.fixture
def fake_steps(monkeypatch):
    """Replace prune/distill by the copy step, keeping the real registry's shape (inputs, stages)."""
    CALLS.clear()
    kinds = dict(recipes.STEP_KINDS)
    kinds["prune"] = CopyKind("prune", "-", "-", "-", "model", "pruned")
    kinds["copy"] = CopyKind("copy", "-", "-", "-", "model", "copied")
    monkeypatch.setattr(recipes, "STEP_KINDS", kinds)
    return CALLS


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def base(tmp_path) -> Path:
    """A directory that resolves as a model (load_model is never called by the copy step)."""
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


# --------------------------------------------------------------------------- parsing and planning

def test_defaults_chain_inputs_and_outputs(tmp_path, base, fake_steps):
    r = write(tmp_path, f"""
model: {base}
out: {tmp_path}/out
steps:
  - prune: {{scale: 2}}
  - copy: {{tags: x}}
  - name: again
    copy: {{model: base}}
  - quantize: {{bits: 3, nsamples: 4}}
""")
    plan = recipes.load(r)
    names = [s.name for s in plan.steps]
    assert names == ["prune", "copy", "again", "quantize"]
    prune, copy, again, quant = plan.steps
    assert prune.options.model == str(base) and prune.options.output == str(tmp_path / "out" / "prune")
    assert prune.options.scale == 2.0 and isinstance(prune.options.scale, float)   # int -> float
    assert copy.options.model == prune.options.output and copy.options.tags == ["x"]   # one value = a list
    assert again.options.model == str(base)                                            # `base` reference
    assert quant.options.model == again.options.output and quant.options.bits == 3
    assert [s.status for s in plan.steps] == ["run"] * 4
    assert plan.stages() == [("base", str(base)), ("pruned", prune.options.output),
                             ("copied", copy.options.output), ("again", again.options.output),
                             ("quantized", quant.options.output)]


def test_bench_and_distill_defaults(tmp_path, base, fake_steps):
    r = write(tmp_path, f"""
model: {base}
out: {tmp_path}/out
data_dir: {tmp_path}
steps:
  - prune: {{}}
  - distill: {{steps: 2}}
  - bench: {{}}
""")
    plan = recipes.load(r)
    prune, distill, bench = plan.steps
    assert distill.options.student == prune.options.output
    assert distill.options.teacher == str(base)            # teacher: base by default
    assert distill.options.output == str(tmp_path / "out" / "distill")
    assert bench.options.baseline == str(base)             # baseline: base, its own row
    assert bench.options.models == [prune.options.output, distill.options.output]
    # top-level data_dir reaches every step that has one (the copy step has none)
    assert distill.options.data_dir == str(tmp_path) and bench.options.data_dir == str(tmp_path)


@pytest.mark.parametrize("body, message", [
    ("steps:\n  - prune: {{}}\n", "no model"),
    ("model: {base}\nsteps:\n  - prune: {{}}\n", "no out"),
    ("model: {base}\nout: {tmp}/o\n", "no steps"),
    ("model: {base}\nout: {tmp}/o\nstep: []\n", "unknown key 'step'"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - prnue: {{}}\n", "step 1: unknown step 'prnue'"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{}}\n  - copy: {{scael: 2}}\n",
     "step 2 (copy-2): unknown option 'scael' (did you mean 'scale'?)"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{scale: fast}}\n", "option 'scale' must be float, got 'fast'"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{scale: true}}\n", "option 'scale' must be float"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - quantize: {{bits: 4.5}}\n", "step 1 (quantize): option 'bits' must be"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - quantize: {{method: gtpq}}\n", "step 1 (quantize): unknown --method"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{scale: -1}}\n", "step 1 (copy): --scale must be positive"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{force: true}}\n", "option 'force' is not set in a recipe"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{model: later}}\n  - name: later\n    copy: {{}}\n",
     "refers to step 'later', which does not come before it"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{}}\n    prune: {{}}\n", "several keys"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy\n", "a step is a mapping"),
    ("model: {tmp}/nope\nout: {tmp}/o\nsteps:\n  - copy: {{}}\n", "does not exist"),
    ("model: {base}\nout: {tmp}/o\nsteps:\n  - copy: {{model: {tmp}/nope}}\n",
     "step 1 (copy): option 'model': model path"),
    ("model: {base}\nout: {tmp}/o\nsteps: [{{name: a, copy: {{}}}}, {{name: a, copy: {{}}}}]\n", "repeated"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_validation_errors_name_file_step_and_key(tmp_path, base, fake_steps, body, message):
    r = write(tmp_path, body.format(base=base, tmp=tmp_path))
    with pytest.raises(UserError) as e:
        recipes.load(r)
    assert message in str(e.value)
    assert str(r) in str(e.value)
    assert not (tmp_path / "o").exists() and fake_steps == []


def test_an_error_in_a_late_step_stops_before_the_first_runs(tmp_path, base, fake_steps, cli):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - quantize: {{bits: x}}\n")
    code, out, err = cli("run", r)
    assert code == 2 and "step 2 (quantize): option 'bits'" in err
    assert fake_steps == [] and not (tmp_path / "out").exists()


def test_missing_step_module_is_a_clear_error(tmp_path, base, monkeypatch):
    kinds = dict(recipes.STEP_KINDS)
    kinds["prune"] = StepKind("prune", "llmopt.no_such_module", "PruneOptions", "prune", "model", "pruned")
    monkeypatch.setattr(recipes, "STEP_KINDS", kinds)
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/o\nsteps:\n  - prune: {{}}\n")
    with pytest.raises(UserError, match="step 'prune' needs llmopt.no_such_module"):
        recipes.load(r)


# --------------------------------------------------------------------------- names and outputs stay apart

@pytest.mark.parametrize("name", ["''", "' '", "' copy'", "a b", "'\\t'", ".", "..", "a/b", "/abs", "a\\\\b", "null"])
def test_a_step_name_that_is_no_plain_name_is_refused(tmp_path, base, fake_steps, name):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n"
                        f"  - name: {name}\n    copy: {{}}\n")
    with pytest.raises(UserError, match="step 2: step name .* must be a plain name"):
        recipes.load(r)
    assert fake_steps == [] and not (tmp_path / "out").exists()


def test_an_empty_step_name_from_set_fails_dry_run_and_force_keeps_earlier_outputs(tmp_path, base, fake_steps,
                                                                                    cli):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - quantize: {{}}\n")
    code, out, err = cli("run", r, "--dry-run", "--set", 'quantize.name=""')
    assert code == 2 and "step 2: step name '' must be a plain name" in err and "validated" not in err

    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n"
                        "  - name: second\n    copy: {}\n", "two.yaml")
    code, out, err = cli("run", r)
    assert code == 0, err
    fake_steps.clear()
    code, out, err = cli("run", r, "--force", "--set", 'second.name=""')
    assert code == 2 and "step name '' must be a plain name" in err and fake_steps == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy", "second"]
    assert (tmp_path / "out" / "copy" / "config.json").is_file()


@pytest.mark.parametrize("output, what", [
    ("{out}", "is the recipe's out"),
    ("{tmp}", "contains the recipe's out"),
    ("{out}/copy", "two steps write to"),
    ("{out}/copy/inner", "inside step 1 (copy)'s output"),
    ("{out}/..", "contains the recipe's out"),
    ("{base}", "would replace the base model {base}"),
    ("{tmp}/elsewhere/..", "contains the recipe's out"),
])
def test_an_explicit_output_that_would_replace_out_an_input_or_another_output_is_refused(
        tmp_path, base, fake_steps, cli, output, what):
    out = tmp_path / "out"
    (out / "copy").mkdir(parents=True)
    keep = out / "copy" / "keep.txt"
    keep.write_text("mine")
    output = output.format(out=out, tmp=tmp_path, base=base)
    r = write(tmp_path, f"model: {base}\nout: {out}\nsteps:\n  - copy: {{}}\n"
                        f"  - name: second\n    copy: {{output: {output}}}\n")
    code, _, err = cli("run", r, "--dry-run", "--force")
    assert code == 2 and what.format(base=base) in err, err
    assert fake_steps == [] and keep.read_text() == "mine" and (base / "config.json").is_file()


def test_a_step_output_containing_an_earlier_output_is_refused(tmp_path, base, fake_steps):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out/deep\nsteps:\n  - copy: {{}}\n"
                        f"  - name: second\n    copy: {{output: {tmp_path}/out/deep/copy/..}}\n")
    with pytest.raises(UserError, match="is the recipe's out"):
        recipes.load(r)
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out/deep\nsteps:\n"
                        f"  - copy: {{output: {tmp_path}/out/a/b}}\n"
                        f"  - name: second\n    copy: {{output: {tmp_path}/out/a}}\n")
    with pytest.raises(UserError, match="step 2 \\(second\\): output .*/out/a contains step 1 \\(copy\\)'s output"):
        recipes.load(r)


def test_an_unwritable_output_is_found_before_step_1(tmp_path, base, fake_steps, cli, monkeypatch):
    from llmopt import checkpoint

    probed = []

    def check_writable(path):
        probed.append(Path(path))
        if Path(path).name == "copy-2":
            raise UserError(f"cannot create {path}: permission denied")

    monkeypatch.setattr(checkpoint, "check_writable", check_writable, raising=False)
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - copy: {{}}\n")
    code, _, err = cli("run", r, "--dry-run")
    assert code == 2 and "step 2 (copy-2): cannot create" in err and "permission denied" in err
    assert probed == [tmp_path / "out" / "copy", tmp_path / "out" / "copy-2"]
    code, _, err = cli("run", r)
    assert code == 2 and fake_steps == [] and not (tmp_path / "out").exists()


def test_an_output_under_a_file_is_unwritable_at_dry_run(tmp_path, base, fake_steps, cli):
    (tmp_path / "afile").write_text("not a folder")
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/afile/out\nsteps:\n  - copy: {{}}\n")
    code, _, err = cli("run", r, "--dry-run")
    assert code == 2 and "step 1 (copy)" in err and fake_steps == []
    assert (tmp_path / "afile").read_text() == "not a folder"


# --------------------------------------------------------------------------- --set

def test_set_overrides(tmp_path, base, fake_steps):
    other = tmp_path / "other"
    shutil.copytree(base, other)
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{scale: 2}}\n"
                        f"  - name: second\n    copy: {{}}\n  - quantize: {{}}\n")
    plan = recipes.load(r, [f"model={other}", f"out={tmp_path}/elsewhere", "copy.scale=3",
                            "second.tags=[a, b]", "steps.3.bits=8", "steps.3.method=int8",
                            "quantize.group_size=-1"])
    copy, second, quant = plan.steps
    assert copy.options.model == str(other) and copy.options.scale == 3.0
    assert copy.options.output == str(tmp_path / "elsewhere" / "copy")
    assert second.options.tags == ["a", "b"]
    assert (quant.options.bits, quant.options.method, quant.options.group_size) == (8, "int8", -1)
    for bad, message in [("nonsense", "expected key=value"), ("steps.9.x=1", "has steps 1 to 3"),
                         ("steps.0.x=1", "has steps 1 to 3"), ("nostep.scale=1", "no step named 'nostep'"),
                         ("copy.scael=1", "unknown option 'scael'"), ("copy.scale=abc", "must be float"),
                         ("modle=x", "unknown top-level key")]:
        with pytest.raises(UserError, match=message):
            recipes.load(r, [bad])


# --------------------------------------------------------------------------- dry run, resume, --force

def test_dry_run_runs_nothing_and_shows_the_plan(tmp_path, base, fake_steps, cli):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{scale: 2}}\n  - copy: {{}}\n")
    code, out, err = cli("run", r, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert [(s["name"], s["status"], s["input"]) for s in plan["steps"]] == [
        ("copy", "run", str(base)), ("copy-2", "run", str(tmp_path / "out" / "copy"))]
    assert plan["steps"][0]["options"]["scale"] == 2.0
    code, out, err = cli("run", r, "--dry-run")
    assert code == 0 and "copy-2" in err and "nothing ran" in err and out == ""
    assert fake_steps == [] and not (tmp_path / "out").exists()


def test_resume_skips_finished_steps_and_reruns_changed_ones(tmp_path, base, fake_steps, cli):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{scale: 2}}\n"
                        "  - copy: {}\n  - copy: {}\n")
    code, out, err = cli("run", r, "--json")
    assert code == 0, err
    assert len(fake_steps) == 3 and [s["status"] for s in json.loads(out)["steps"]] == ["run"] * 3

    fake_steps.clear()
    assert [s.status for s in recipes.load(r).steps] == ["skip"] * 3
    code, out, err = cli("run", r, "--json")
    assert code == 0 and fake_steps == []
    assert json.loads(out)["steps"][2]["summary"]["skipped"] is True

    # A changed parameter is never overwritten silently: the plan stops before anything runs.
    code, out, err = cli("run", r, "--set", "copy-2.scale=5")
    assert code == 2 and "copy-2" in err and "scale 1.0 -> 5.0" in err and "--force" in err
    assert fake_steps == []

    # Removing a middle output reruns it and everything downstream of it, not what came before.
    shutil.rmtree(tmp_path / "out" / "copy-2")
    plan = recipes.load(r)
    assert [(s.status, s.reason) for s in plan.steps] == [
        ("skip", "done"), ("run", "new"), ("run", "input rebuilt (copy-2)")]
    code, out, err = cli("run", r)
    assert code == 0, err
    assert [c.output for c in fake_steps] == [str(tmp_path / "out" / n) for n in ("copy-2", "copy-3")]

    # --force reruns everything, including the changed parameter.
    fake_steps.clear()
    code, out, err = cli("run", r, "--force", "--set", "copy-2.scale=5", "--json")
    assert code == 0, err
    assert len(fake_steps) == 3 and fake_steps[1].scale == 5.0 and all(c.force for c in fake_steps)


def test_an_option_added_later_at_its_default_still_resumes(tmp_path, base, fake_steps):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{scale: 2}}\n")
    recipes.run(recipes.load(r))
    record_path = tmp_path / "out" / "copy" / "llmopt.json"
    record = json.loads(record_path.read_text())
    del record["parameters"]["tags"]          # as written by a release without --tags
    record_path.write_text(json.dumps(record))
    assert recipes.load(r).steps[0].status == "skip"
    with pytest.raises(UserError, match="tags not recorded"):
        recipes.load(r, ["copy.tags=[a]"])


def test_a_foreign_directory_in_the_way_is_not_overwritten(tmp_path, base, fake_steps, cli):
    (tmp_path / "out" / "copy").mkdir(parents=True)
    (tmp_path / "out" / "copy" / "precious.txt").write_text("mine")
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n")
    code, out, err = cli("run", r)
    assert code == 2 and "not written by this step" in err
    assert (tmp_path / "out" / "copy" / "precious.txt").read_text() == "mine" and fake_steps == []


def _weights(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


def test_resume_reruns_a_step_whose_input_changed_in_an_interrupted_force_run(tmp_path, base, fake_steps, cli):
    (base / "model.safetensors").write_bytes(b"old weights")
    out = tmp_path / "out"
    r = write(tmp_path, f"model: {base}\nout: {out}\nsteps:\n  - copy: {{}}\n  - copy: {{}}\n  - copy: {{}}\n")
    code, _, err = cli("run", r)
    assert code == 0, err
    (base / "model.safetensors").write_bytes(b"new weights")   # same size, other content

    def stop_before_step_2(step):
        if step.index == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        recipes.run(recipes.load(r, force=True), on_step=stop_before_step_2)
    assert _weights(out / "copy") == b"new weights" and _weights(out / "copy-2") == b"old weights"

    fake_steps.clear()
    plan = recipes.load(r)
    assert [(s.status, s.reason) for s in plan.steps] == [
        ("skip", "done"), ("run", "input changed (copy)"), ("run", "input rebuilt (copy-2)")]
    code, _, err = cli("run", r)
    assert code == 0, err
    assert [c.output for c in fake_steps] == [str(out / "copy-2"), str(out / "copy-3")]
    assert _weights(out / "copy-2") == _weights(out / "copy-3") == b"new weights"
    assert [s.status for s in recipes.load(r).steps] == ["skip"] * 3


def test_a_step_that_stopped_on_an_interrupt_ends_the_run_and_is_rerun_on_resume(tmp_path, base, fake_steps,
                                                                                  monkeypatch, cli):
    """distill saves its best-so-far and returns when interrupted: the recipe must stop there, and
    resume must rerun that step rather than take the half-trained model as done."""
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - copy: {{}}\n")

    def interrupted_copy(opts, progress=None):
        return {**copy_step(opts, progress), "stopped": "interrupted"}

    normal_load = CopyKind.load
    monkeypatch.setattr(CopyKind, "load", lambda self: (CopyOptions, interrupted_copy))
    code, _, err = cli("run", r)
    assert code == 130 and "interrupted" in err
    assert [c.output for c in fake_steps] == [str(tmp_path / "out" / "copy")]   # step 2 never ran
    monkeypatch.setattr(CopyKind, "load", normal_load)
    assert [s.status for s in recipes.load(r).steps] == ["run", "run"]


def test_a_changed_base_model_reruns_the_steps_built_from_it(tmp_path, base, fake_steps):
    (base / "model.safetensors").write_bytes(b"weights")
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - copy: {{}}\n")
    recipes.run(recipes.load(r))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert [(s.status, s.reason) for s in recipes.load(r).steps] == [
        ("run", "input changed (base)"), ("run", "input rebuilt (copy)")]


def test_an_output_without_a_recorded_input_fingerprint_is_rerun(tmp_path, base, fake_steps):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - copy: {{}}\n")
    recipes.run(recipes.load(r))
    record_path = tmp_path / "out" / "copy-2" / "llmopt.json"
    record = json.loads(record_path.read_text())
    del record[recipes.INPUTS_KEY]             # as written before inputs were recorded, or by `llmopt copy`
    record_path.write_text(json.dumps(record))
    plan = recipes.load(r)
    assert [s.status for s in plan.steps] == ["skip", "run"]
    assert "no input fingerprint recorded" in plan.steps[1].reason and plan.steps[1].overwrite
    fake_steps.clear()
    recipes.run(plan)
    assert [c.output for c in fake_steps] == [str(tmp_path / "out" / "copy-2")]
    assert recipes.INPUTS_KEY in json.loads(record_path.read_text())


# --------------------------------------------------------------------------- every option check before step 1

@pytest.mark.parametrize("options", ["{bits: 5}", "{method: nf4, group_size: 64}"])
def test_quantize_method_checks_fail_at_dry_run_before_step_1(tmp_path, base, fake_steps, cli, options):
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - quantize: {options}\n")
    code, _, err = cli("run", r, "--dry-run")
    assert code == 2 and "step 2 (quantize)" in err and "validated" not in err, err
    code, _, err = cli("run", r)
    assert code == 2 and "step 2 (quantize)" in err
    assert fake_steps == [] and not (tmp_path / "out").exists()


def test_prune_and_distill_validate_their_data_device_and_dtype(tmp_path):
    from llmopt.distill import DistillOptions
    from llmopt.prune import PruneOptions

    nope = str(tmp_path / "nope.txt")
    cases = [(PruneOptions("m", "o", calib=nope), f"--calib {nope} is neither a file"),
             (PruneOptions("m", "o", dtype="float12"), "invalid --dtype 'float12'"),
             (PruneOptions("m", "o", device="tpu"), "invalid --device 'tpu'"),
             (DistillOptions("t", "s", "o", data=nope), f"--data {nope} is neither a file")]
    for opts, message in cases:
        with pytest.raises(UserError) as e:
            opts.validate()
        assert message in str(e.value)


@pytest.mark.parametrize("options, message", [
    ("{ratio: 0.8, axes: 'heads,mlp'}", "step 1 (prune): --ratio 0.8 is too high"),
    ("{target_params: 1000}", "step 1 (prune): --target-params 1000 is too low"),
    ("{layers: '1:'}", "step 1 (prune): --layers 1: would leave layers [0] at full width"),
    ("{calib: nope.txt}", "step 1 (prune): --calib nope.txt is neither a file"),
])
def test_prune_checks_that_need_the_config_fail_at_dry_run(tiny_model_dir, tmp_path, cli, options, message):
    model = tiny_model_dir("llama")
    r = write(tmp_path, f"model: {model}\nout: {tmp_path}/out\nsteps:\n  - prune: {options}\n  - distill: {{}}\n")
    code, _, err = cli("run", r, "--dry-run")
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_force_stops_before_step_1_when_a_later_output_is_a_foreign_folder(tmp_path, base, fake_steps, cli):
    (tmp_path / "out" / "copy-2").mkdir(parents=True)
    (tmp_path / "out" / "copy-2" / "precious.txt").write_text("mine")
    r = write(tmp_path, f"model: {base}\nout: {tmp_path}/out\nsteps:\n  - copy: {{}}\n  - copy: {{}}\n")
    code, out, err = cli("run", r, "--force", "--dry-run")
    assert code == 2 and "step 2 (copy-2)" in err and "not an earlier llmopt output" in err
    code, out, err = cli("run", r, "--force")
    assert code == 2 and fake_steps == [] and not (tmp_path / "out" / "copy").exists()
    assert (tmp_path / "out" / "copy-2" / "precious.txt").read_text() == "mine"


# --------------------------------------------------------------------------- shipped recipes

@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_validate_with_dry_run(path, cli, tmp_path, monkeypatch):
    data = recipes.read_recipe(path)
    # Recipes naming wikitext2 need its files (offline) before they start: give them a data folder.
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        (tmp_path / name).write_text(" = A = \n")
    monkeypatch.setenv("LLMOPT_DATA", str(tmp_path))
    # Hub-id recipes stay valid offline: resolving a hub id does not touch the network.
    code, out, err = cli("run", path, "--dry-run", "--json", "--set", f"out={tmp_path}/out")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"] == data["model"] and all(s["status"] == "run" for s in plan["steps"])
    assert not (tmp_path / "out").exists()


def test_shipped_recipes_exist():
    assert {p.name for p in SHIPPED} >= {"smollm2-gptq4.yaml", "smollm2-prune20-distill-gptq4.yaml",
                                         "llama3-8b-gptq4.yaml", "qwen-prune-distill.yaml"}


# --------------------------------------------------------------------------- end to end, real steps

def _have(*modules: str) -> bool:
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return False
        except ModuleNotFoundError:
            return False
    return True


@pytest.mark.skipif(not _have("llmopt.prune", "llmopt.distill", "llmopt.quantize.pipeline", "llmopt.bench.run"),
                    reason="needs the prune, distill, quantize (gptq) and bench steps")
def test_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, cli):
    model = tiny_model_dir("llama")
    text = tmp_path / "text.txt"
    from pydoc_data.topics import topics

    text.write_text("\n\n".join(topics.values()))
    r = write(tmp_path, f"""
model: {model}
out: {tmp_path}/out
device: cpu
steps:
  - prune: {{ratio: 0.2, calib: {text}, nsamples: 4, seq_len: 32}}
  - distill: {{data: {text}, steps: 2, seq_len: 32, eval_windows: 2}}
  - quantize: {{group_size: 32, calib: {text}, nsamples: 4, seq_len: 32}}
  - bench: {{ppl_data: {text}, seq_len: 32, ppl_windows: 2, prompt_len: 8, gen_len: 4, repeats: 1,
             memory: false}}
""")
    code, out, err = cli("run", r, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [s["status"] for s in result["steps"]] == ["run"] * 4
    assert [s["stage"] for s in result["stages"]] == ["base", "pruned", "distilled", "quantized"]
    for name in ("prune", "distill", "quantize"):
        assert (tmp_path / "out" / name / "llmopt.json").is_file()
    assert result["report"]
    # Everything is done: a second run skips every step and still shows the stage table.
    code, out2, err = cli("run", r)
    assert code == 0, err
    assert err.count("skip step") == 4 and "stages vs base" in err
    for label in ("base", "pruned", "distilled", "quantized"):
        assert label in err
    report = json.loads((tmp_path / "out" / "bench" / "report.json").read_text())
    assert report == result["report"]
    rows = {row["stage"]: row for row in result["stages"]}
    assert rows["pruned"]["metrics"]["parameters"] < rows["base"]["metrics"]["parameters"]
    assert rows["quantized"]["metrics"]["weight_bytes"] < rows["distilled"]["metrics"]["weight_bytes"]
    ppl = {label: rows[label]["metrics"]["perplexity"] for label in ("base", "quantized")}
    assert rows["quantized"]["deltas"]["perplexity"]["x"] == pytest.approx(ppl["quantized"] / ppl["base"])
