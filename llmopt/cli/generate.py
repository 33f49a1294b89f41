"""`llmopt generate MODEL PROMPT`: stream a continuation, report time to first token and tokens/s."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated

import typer

from llmopt.cli.common import Device, Dtype, Head, Json, RichProgress, app, err_console, print_json
from llmopt.errors import UserError
from llmopt.generate import GenerateOptions, generate as run_generate
from llmopt.models import load_model

D = GenerateOptions


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Directory, .gguf file, hub id or alias.")],
    prompt: Annotated[str, typer.Argument(help="The prompt, or '-' to read it from stdin.")] = "-",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = D.max_new_tokens,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = D.temperature,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = D.top_k,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = D.top_p,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = D.repetition_penalty,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1 = off; beams do not stream).")] = D.num_beams,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when this text appears (repeatable).")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    head: Head = "auto",
    json: Json = False,
) -> None:
    """Generate text from a prompt, streaming tokens to stdout and timings to stderr."""
    if prompt == "-":
        prompt = _read_stdin()
    opts = GenerateOptions(prompt=prompt, max_new_tokens=max_new_tokens, chat=chat, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, num_beams=num_beams,
                           seed=seed, stop=list(stop or []))
    opts.validate()  # before the (slow) load
    loaded = load_model(model, device=device, dtype=dtype, progress=RichProgress(not json), head=head)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run_generate(loaded.model, loaded.tokenizer, opts, on_text=None if json else stream)
    if json:
        out = asdict(result)
        out.update(model=model, prompt=opts.prompt, device=str(loaded.device))
        print_json(out)
        return
    sys.stdout.write("\n")
    decode = f"{result.decode_tok_s:.1f} tok/s" if result.decode_tok_s else "-"
    err_console.print(f"[dim]{result.prompt_tokens} prompt tokens, {result.new_tokens} new ({result.stop_reason}); "
                      f"time to first token {result.ttft_s * 1000:.0f} ms; decode {decode}[/dim]", highlight=False)


def _read_stdin() -> str:
    """The prompt from stdin, decoded strictly so bad bytes stop here rather than in the tokenizer."""
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:   # a text-only stream (already decoded)
        return sys.stdin.read()
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt on stdin is not valid UTF-8 (byte {e.start})",
                        hint="pass text encoded as UTF-8") from None
