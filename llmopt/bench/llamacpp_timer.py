"""llama.cpp timed in a process of its own, with OpenMP waiting as it does when it runs by itself.

llmopt's CLI makes OpenMP threads wait passively (a busy machine needs it for torch). llama.cpp and torch
load the same `libgomp.so.1`, which reads its wait policy once per process, so in bench's process
llama.cpp would decode under torch's policy: on a 2-core CPU its 2-thread decode was 3-4x slower that way
than with OpenMP's default (docs/runtime.md). So bench times a GGUF file that llama.cpp runs in a child
process started without OMP_WAIT_POLICY, which serves one timed generation per request, in bench's
interleaved rounds (the parent waits, idle, meanwhile). Scoring stays in bench's process: logits do not
depend on how threads wait.

The child is `python -m llmopt.bench.llamacpp_timer GGUF CONTEXT THREADS`: one JSON request per line on
stdin ({"prompt": [[ids]], "gen_len": n}), one reply line per request on stdout, starting with REPLY; it
ends at the end of its input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPLY = "llmopt-timing "


class ApartTimer:
    """`timer(prompt, gen_len) -> (ttft_s, decode_s)`: a generation timed as `speed.time_generation` times
    it, by the child process that holds the GGUF file open."""

    def __init__(self, path: str | Path, context: int, threads: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmopt.bench.llamacpp_timer", str(path), str(context), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        try:
            self._reply()               # loaded
        except BaseException:
            self.close()
            raise

    def __call__(self, prompt: torch.Tensor, gen_len: int) -> tuple[float, float]:
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"llama.cpp runs one sequence at a time, got a prompt of shape {list(prompt.shape)}")
        self._proc.stdin.write(json.dumps({"prompt": prompt.tolist(), "gen_len": gen_len}) + "\n")
        self._proc.stdin.flush()
        ttft_s, decode_s = self._reply()
        return ttft_s, decode_s

    def _reply(self):
        for line in self._proc.stdout:
            if line.startswith(REPLY):
                status, payload = json.loads(line[len(REPLY):])
                if status != "ok":
                    raise RuntimeError(f"llama.cpp's timing process: {payload}")
                return payload
        self._proc.wait()
        self._log.seek(0)
        last = (self._log.read().strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"llama.cpp's timing process ended (exit code {self._proc.returncode}): {last}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()


def _serve(path: str, context: int, threads: int) -> None:
    from llmopt.bench.llamacpp import load_llamacpp
    from llmopt.bench.speed import time_generation

    torch.set_num_threads(threads)
    try:
        model = load_llamacpp(path, context, tokenizer=False, threads=threads).model
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        print(REPLY + json.dumps(["error", f"{type(e).__name__}: {e}"]), flush=True)
        return
    print(REPLY + json.dumps(["ok", None]), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            t = time_generation(model, torch.tensor(job["prompt"], dtype=torch.long), job["gen_len"])
            reply = ["ok", [t.ttft_s, t.decode_s]]
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            reply = ["error", f"{type(e).__name__}: {e}"]
        print(REPLY + json.dumps(reply), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
