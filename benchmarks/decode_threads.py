"""One thread or all of them, for a small weight-only kernel call at decode; fused vs separate siblings;
and, with --attention, one thread or all for a decode step's attention.

    OMP_WAIT_POLICY=passive python benchmarks/decode_threads.py
    OMP_WAIT_POLICY=passive python benchmarks/decode_threads.py --attention
    OMP_WAIT_POLICY=passive python benchmarks/decode_threads.py --decode out/runtime-bench/smollm2-135m-gptq4

Times PyTorch's CPU int4 (`_weight_int4pack_mm_for_cpu`) and int8 (`_weight_int8pack_mm`) kernels on
random weights of SmolLM2-135M's and larger shapes, at a few row counts, on one thread and on
`torch.get_num_threads()` threads, interleaved (median of rounds, microseconds per call). Then q/k/v
and gate/up as three/two calls against one call on their concatenated rows. The crossover it shows
is where `llmopt.quantize.qlinear.ONE_THREAD_MAX_BYTES` / `ONE_THREAD_MAX_ROWS` come from
(docs/runtime.md). `--attention` times `scaled_dot_product_attention` for one query token over a KV
cache of SmolLM2-135M's and Gemma3-270M's attention shapes, in the two forms transformers calls it in
(grouped-query heads with no mask; query heads folded into the query length, with the sliding-window
mask), at a few cache lengths: where `llmopt.attention.ONE_THREAD_MAX_QUERIES` and
`ONE_THREAD_MAX_KV_BYTES` come from. Those limits only bound which calls may go to one thread; whether
one does is measured at run time (`llmopt.one_thread.call_small`). `--decode MODEL` times eager greedy
decoding of MODEL (`llmopt.bench.speed.time_generation`, 512-token wiki.test prompt) with that measured
choice, with every small call on one thread, and with none, interleaved, and prints what was measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (name, out, in)
    ("SmolLM2 q/o", 576, 576), ("SmolLM2 q+k+v", 960, 576), ("SmolLM2 down", 576, 1536),
    ("SmolLM2 gate+up", 3072, 576), ("2048 x 1024", 2048, 1024), ("2048 x 2048", 2048, 2048),
    ("4096 x 2048", 4096, 2048), ("SmolLM2 head", 49152, 576),
]


def int4(n: int, k: int, group: int = 64):
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    sz = torch.rand(k // group, n, 2).to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz)), n * k / 2


def int8(n: int, k: int):
    w, s = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, w, s)), n * k


def per_call_us(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def time_threads(fn, threads: list[int], rounds: int, calls: int) -> list[float]:
    """Median per-call microseconds at each thread count, the counts interleaved round by round."""
    runs: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(rounds):
        for t in threads:
            torch.set_num_threads(t)
            runs[t].append(per_call_us(fn, calls))
    return [statistics.median(runs[t]) for t in threads]


ATTENTION = [  # (name, query heads, KV heads, head dim)
    ("SmolLM2-135M", 9, 3, 64), ("Gemma3-270M", 4, 1, 256),
]


def attention(rounds: int, many: int) -> None:
    """One query token's attention over caches of a few lengths, on one thread and on all."""
    print(f"torch {torch.__version__}; attention for one query token, microseconds per call, median of "
          f"{rounds} rounds; cells: 1 thread / {many} threads, * = one thread faster")
    lengths = (128, 512, 1024, 2048)
    print(f"{'model':14} {'form':22} " + " ".join(f"{'cache ' + str(n):>16}" for n in lengths))
    for name, heads, kv, dim in ATTENTION:
        for form in ("grouped, no mask", "folded, sliding mask"):
            cells = []
            for n in lengths:
                k, v = torch.randn(1, kv, n, dim), torch.randn(1, kv, n, dim)
                if form.startswith("grouped"):
                    q = torch.randn(1, heads, 1, dim)
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
                else:
                    q, mask = torch.randn(1, kv, heads // kv, dim), torch.ones(1, 1, 1, n, dtype=torch.bool)
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
                one, all_ = time_threads(fn, [1, many], rounds, 200)
                cells.append(f"{one:7.0f}/{all_:<7.0f}{'*' if one < all_ else ' '}")
            print(f"{name:14} {form:22} " + " ".join(cells), flush=True)
    torch.set_num_threads(many)


def decode(spec: str, rounds: int, gen_len: int = 64) -> None:
    """Eager decode tok/s: small calls on the measured thread count, always on one thread, never."""
    from llmopt import one_thread
    from llmopt.bench.speed import time_generation
    from llmopt.data import load_text, random_windows, tokenize
    from llmopt.models import load_model

    loaded = load_model(spec, device="cpu", head="auto")
    ids = random_windows(tokenize(loaded.tokenizer, load_text("auto", "eval").text[:200_000]), 1, 512, 0)
    choices = {"measured": one_thread._measure, "always one thread": lambda fn, args: True,
               "never one thread": lambda fn, args: False}
    caches: dict[str, dict] = {name: {} for name in choices}
    tok_s: dict[str, list[float]] = {name: [] for name in choices}
    names = list(choices)
    for r in range(rounds + 1):                        # round 0 warms up (and measures), discarded
        for name in (names if r % 2 else names[::-1]):
            one_thread._faster_alone, one_thread._measure = caches[name], choices[name]
            t = time_generation(loaded.model, ids, gen_len)
            if r:
                tok_s[name].append((gen_len - 1) / t.decode_s)
    print(f"{spec}: eager decode tok/s, prompt 512, {gen_len} new tokens, {torch.get_num_threads()} threads, "
          f"median of {rounds} interleaved rounds")
    for name in names:
        print(f"  {name:18} {statistics.median(tok_s[name]):6.1f}")
    measured = caches["measured"]
    print(f"measured: {sum(measured.values())} of {len(measured)} kinds of small call faster on one thread")
    for key, alone in measured.items():
        print(f"  {key}: {'one thread' if alone else 'all threads'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--attention", action="store_true", help="time decode attention instead of the kernels")
    ap.add_argument("--decode", metavar="MODEL", help="time eager decoding of MODEL by how small calls choose threads")
    args = ap.parse_args()
    many = torch.get_num_threads()
    if args.decode:
        return decode(args.decode, args.rounds)
    if args.attention:
        return attention(args.rounds, many)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, 1 thread vs {many}; microseconds per call, median of {args.rounds} rounds")
    print(f"{'kernel':6} {'layer':16} {'weight MB':>9} " + " ".join(f"{'M=' + str(m):>16}" for m in rows))
    for kind, build in (("int4", int4), ("int8", int8)):
        for name, n, k in SHAPES:
            fn, nbytes = build(n, k)
            cells = []
            for m in rows:
                x = torch.randn(m, k).to(torch.bfloat16)
                calls = max(5, int(2e8 / nbytes / m))
                one, all_ = time_threads(lambda: fn(x), [1, many], args.rounds, min(calls, 400))
                cells.append(f"{one:7.0f}/{all_:<7.0f}{'*' if one < all_ else ' '}")
            print(f"{kind:6} {name:16} {nbytes / 1e6:9.2f} " + " ".join(cells), flush=True)
    print("cells: 1 thread / all threads; * = one thread faster")
    torch.set_num_threads(many)
    print("\nfused siblings, int4, M=1, all threads (us per layer's worth of calls):")
    for label, parts in (("q, k, v", [(576, 576), (192, 576), (192, 576)]),
                         ("gate, up", [(1536, 576), (1536, 576)])):
        sep = [int4(n, k)[0] for n, k in parts]
        fused = int4(sum(n for n, _ in parts), parts[0][1])[0]
        x = torch.randn(1, parts[0][1]).to(torch.bfloat16)
        for threads in (1, many):
            torch.set_num_threads(threads)
            a = statistics.median(per_call_us(lambda: [f(x) for f in sep], 300) for _ in range(args.rounds))
            b = statistics.median(per_call_us(lambda: fused(x), 300) for _ in range(args.rounds))
            print(f"  {label:9} {threads} thread(s): separate {a:6.0f}  fused {b:6.0f}  ({a / b:.2f}x)")
    torch.set_num_threads(many)


if __name__ == "__main__":
    main()
