"""Nothing a user owns is ever lost: --force limits, unwritable outputs found first, signals, bad prompts."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmopt import checkpoint
from llmopt.checkpoint import PROVENANCE, atomic_output, check_output
from llmopt.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
QUICK = ("--method", "rtn", "--calib", "builtin", "--nsamples", "2", "--seq-len", "32", "--device", "cpu")


def _user_folder(path: Path) -> dict[str, str]:
    """A folder a user cares about: notes and a sub-folder."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "important").write_text("keep me")
    return _snapshot(path)


def _snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _earlier_output(path: Path) -> None:
    path.mkdir(parents=True)
    (path / PROVENANCE).write_text(json.dumps({"llmopt_format": 1, "command": "quantize"}))
    (path / "model.safetensors").write_bytes(b"old weights")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ----------------------------------------------------------------------------- --force replaces only llmopt outputs

def test_force_refuses_a_folder_with_other_files_and_leaves_it_untouched(tiny_model_dir, tmp_path, cli):
    victim = tmp_path / "out" / "victim"
    before = _user_folder(victim)
    code, _, err = cli("quantize", tiny_model_dir("llama"), "-o", victim, "--force", *QUICK)
    assert code == 2, err
    assert "not an earlier llmopt output" in err and "empty folder" in err, err
    assert _snapshot(victim) == before
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]


def test_force_refuses_a_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("a file")
    with pytest.raises(UserError, match="is a file"):
        check_output(target, force=True)
    with pytest.raises(UserError, match="is a file"):
        with atomic_output(target, force=True):
            pass
    assert target.read_text() == "a file"


def test_without_force_a_user_folder_is_not_offered_to_force(tmp_path):
    victim = tmp_path / "victim"
    _user_folder(victim)
    with pytest.raises(UserError, match="not an earlier llmopt output") as e:
        check_output(victim, force=False)
    assert "pass --force" not in str(e.value)


def test_force_replaces_an_earlier_llmopt_output_and_an_empty_folder(tmp_path):
    earlier, empty = tmp_path / "earlier", tmp_path / "empty"
    _earlier_output(earlier)
    empty.mkdir()
    for out in (earlier, empty):
        with pytest.raises(UserError, match="already exists"):
            check_output(out, force=False)
        with atomic_output(out, force=True) as tmp:
            (tmp / "new").write_text("new")
        assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty"]


def test_force_help_says_what_it_replaces(cli):
    code, out, _ = cli("quantize", "--help")
    assert code == 0
    assert "replaces only an earlier llmopt output or an empty folder" in " ".join(out.replace("│", " ").split())


# ----------------------------------------------------------------------------- outputs that contain the cwd

@pytest.mark.parametrize("out", [".", "..", "{cwd}"])
def test_output_containing_the_current_folder_is_refused_up_front(out, tiny_model_dir, tmp_path, monkeypatch, cli):
    src = tiny_model_dir("llama")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = cli("quantize", src, "-o", out.format(cwd=work), "--force", *QUICK)
    assert code == 2, err
    assert "contains the current folder" in err, err
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama", "work"]


# ----------------------------------------------------------------------------- unwritable outputs, before the work

def test_output_under_a_file_is_refused_before_the_work(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("quantize", src, "-o", tmp_path / "afile" / "deeper" / "out", *QUICK)
    assert code == 2, err
    assert "is not a folder" in err and "Loading" not in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "afile").read_text() == "x"


def test_read_only_filesystem_is_found_by_check_output(tmp_path, monkeypatch):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(readonly)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    for out in (readonly / "out", readonly / "missing" / "parent" / "out"):
        with pytest.raises(UserError, match="cannot write"):
            check_output(out, force=False)
        with pytest.raises(UserError, match="cannot write"):
            checkpoint.check_writable(out)
    assert list(readonly.iterdir()) == []


def test_check_writable_creates_nothing(tmp_path):
    checkpoint.check_writable(tmp_path / "a" / "b" / "out")
    checkpoint.check_writable(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        checkpoint.check_writable(tmp_path / "f" / "out")


# ----------------------------------------------------------------------------- no new empty parent folders

def test_bad_input_leaves_no_new_parent_folders(tmp_path, cli):
    code, _, err = cli("quantize", tmp_path / "no-such-model", "-o", tmp_path / "a" / "b" / "out", *QUICK)
    assert code == 2, err
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_removes_the_parents_it_created_when_the_block_fails(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "a" / "b" / "c" / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and list((tmp_path / "a").iterdir()) == []
    with atomic_output(tmp_path / "a" / "b" / "c" / "out") as tmp:
        (tmp / "whole").write_text("x")
    assert (tmp_path / "a" / "b" / "c" / "out" / "whole").is_file()


# ----------------------------------------------------------------------------- stale temporary siblings

def test_stale_siblings_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}", f".out.old-{dead}", f".out.tmp-{alive}", f".other.tmp-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text("x")
    _earlier_output(out)
    check_output(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}", f".out.tmp-{alive}", "out"]


def test_an_earlier_output_renamed_aside_by_a_killed_run_is_restored(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    _earlier_output(tmp_path / f".out.old-{dead}")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    with pytest.raises(UserError, match="already exists"):
        check_output(out, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.safetensors").read_bytes() == b"old weights"


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM, for real

# Loaded by `python -m llmopt` at startup (sitecustomize): every file opened for writing inside a temporary
# sibling pauses for a minute, so the signal reliably lands while the output is half-written.
HOOK = """
import builtins, io, sys, time
real_open = io.open
def slow_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if "w" in mode and ".tmp-" in str(file):
        sys.stderr.write("WRITING\\n"); sys.stderr.flush()
        time.sleep(60)
    return f
io.open = builtins.open = slow_open
"""


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_save_exits_cleanly_and_leaves_nothing(signum, code, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "outs" / "q"
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "llmopt", "quantize", str(src), "-o", str(out), *QUICK],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.strip() == "WRITING":
            break
    assert lines and lines[-1].strip() == "WRITING", "".join(lines)
    proc.send_signal(signum)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == code, "".join(lines) + rest
    assert "interrupted" in rest and signal.Signals(signum).name in rest, rest
    assert f"removed the unfinished output {out}" in " ".join(rest.split()), rest
    assert list(work.iterdir()) == []   # no output, no temporary sibling, no parent folder made for it


def _sigterm_during_load(monkeypatch, handled: bool) -> None:
    """Make `generate`'s model load receive SIGTERM; `handled`: the command catches it and exits 130 itself,
    as distill does after saving its best checkpoint."""
    import time

    import typer

    import llmopt.cli.generate as cli_generate

    def load(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            if handled:
                raise typer.Exit(130) from None
            raise
        raise AssertionError("SIGTERM did not unwind")

    monkeypatch.setattr(cli_generate, "load_model", load)


@pytest.mark.parametrize("handled", [False, True], ids=["unwound", "handled-by-the-command"])
def test_sigterm_exits_143_in_process_and_handlers_are_restored(handled, monkeypatch, cli):
    _sigterm_during_load(monkeypatch, handled)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    code, _, err = cli("generate", "any-model", "hello")
    assert code == 143, err
    assert ("interrupted by SIGTERM" in err) != handled, err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ----------------------------------------------------------------------------- prompts that are not UTF-8

@pytest.mark.parametrize("args", [("caf\udce9",), ("hello", "--stop", "\udcff")], ids=["prompt", "stop"])
def test_argument_with_invalid_utf8_is_refused_before_loading(args, tmp_path, cli):
    code, _, err = cli("generate", tmp_path / "no-such-model", *args)   # loading first would say "does not exist"
    assert code == 2, err
    assert "not valid UTF-8" in err and len(err.strip().splitlines()) == 1, err


def test_stdin_prompt_with_invalid_utf8_is_refused_before_loading(tmp_path, cli, monkeypatch):
    for errors in ("strict", "surrogateescape"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe"), encoding="utf-8",
                                                           errors=errors))
        code, _, err = cli("generate", tmp_path / "no-such-model", "-")
        assert code == 2, err
        assert "not valid UTF-8" in err and len(err.strip().splitlines()) == 1, err


def test_cli_sets_passive_openmp_waiting_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, when torch's runtime loads: set after `import torch` it does
    nothing, and spinning threads stall a shared CPU. The CLI must set it before torch is imported,
    and leave a value the user chose alone."""
    probe = textwrap.dedent("""
        import importlib.abc, os, sys
        seen = []
        class Watch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not seen:
                    seen.append(os.environ.get("OMP_WAIT_POLICY"))
                return None
        sys.meta_path.insert(0, Watch())
        import llmopt.cli
        print(seen[0])
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert run.stdout.strip() == "passive"
    env["OMP_WAIT_POLICY"] = "active"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert run.stdout.strip() == "active"
