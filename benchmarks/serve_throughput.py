"""`kit serve` with continuous batching vs one request at a time, on the embedded mini base, CPU.

C clients (OpenAI's async client, streaming) each ask for N new tokens (greedy, an image each),
their requests sent evenly over a spread of 0, 100 and 500 ms (the first at 0, the last at the
spread). The same server answers unbatched (--max-batch 1: one request decoded at a time) and
batched (--max-batch C), alternating, `--rounds` times each per spread. Printed per spread, the
median of the rounds: completion tokens/s over the burst, p50 / p95 request latency, p50 time to
first token, the most rows decoded in one step; then the ratio of the median tokens/s. Target:
batched >= 3x unbatched at every spread, every greedy answer identical across all runs.

    .venv/bin/python benchmarks/serve_throughput.py [--concurrency 8 --tokens 64 --rounds 3 --spreads 0,100,500] [--json out.json]

Exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from kit.base.mini import mini_base  # noqa: E402
from kit.serve.app import create_app  # noqa: E402
from kit.serve.pool import load_pool  # noqa: E402
from kit.core.http import running  # noqa: E402

QUESTIONS = ["Describe this image in detail.", "What does this scan show? Explain every finding.",
             "Write a long caption for this picture.", "List everything you can see, one by one."]


def image_url(seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def burst(url: str, model: str, concurrency: int, tokens: int, spread_s: float = 0.0) -> dict:
    """One burst: request i is sent at i * spread / (C - 1) s; each streamed, timed to its first
    token and its end."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=600)
    t0 = time.perf_counter()

    async def one(i: int):
        await asyncio.sleep(i * spread_s / max(1, concurrency - 1))
        sent = time.perf_counter()
        first, text, used = None, "", 0
        stream = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(i)}},
                                                   {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}])
        async for c in stream:
            if c.usage is not None:
                used = c.usage.completion_tokens
            if c.choices and c.choices[0].delta.content:
                first = first or time.perf_counter()
                text += c.choices[0].delta.content
        end = time.perf_counter()
        return end - sent, (first or end) - sent, used, text

    try:
        results = await asyncio.gather(*[one(i) for i in range(concurrency)])
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    completion = sum(r[2] for r in results)
    return {"wall_s": wall, "completion_tokens": completion, "tokens_per_s": completion / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "ttft_p50_s": statistics.median(r[1] for r in results), "answers": [r[3] for r in results]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each setting per spread (the median is reported)")
    ap.add_argument("--spreads", default="0,100,500", help="ms over which a burst's requests are sent, comma-separated")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    spreads = [int(x) for x in args.spreads.split(",")]

    base = mini_base()
    pool = load_pool(base, [], echo=lambda m: None, max_batch=args.concurrency)
    model = pool.names[0]
    app = create_app(pool, max_tokens_limit=max(1024, args.tokens))
    settings = (("unbatched", 1), ("batched", args.concurrency))
    runs: dict[int, dict[str, list[dict]]] = {ms: {label: [] for label, _ in settings} for ms in spreads}
    with running(app) as url:
        asyncio.run(burst(url, model, 2, 4))  # warm-up: first-call costs are nobody's throughput
        for ms in spreads:
            for _ in range(args.rounds):
                for label, max_batch in settings:  # alternating: a slow spell of the machine hits both
                    pool.batcher.max_batch, pool.batcher.largest = max_batch, 0
                    r = asyncio.run(burst(url, model, args.concurrency, args.tokens, ms / 1000))
                    r["rows_together"] = pool.batcher.largest
                    runs[ms][label].append(r)
    answers = {tuple(r["answers"]) for per in runs.values() for rs in per.values() for r in rs}
    same = len(answers) == 1
    print(f"kit serve, mini base ({base}), CPU: {args.concurrency} requests x {args.tokens} new tokens, greedy, "
          f"one image each, streamed; median of {args.rounds} alternating runs per setting")
    print("| spread ms | setting | tokens/s | p50 s | p95 s | TTFT p50 s | most rows together |")
    print("|---|---|---|---|---|---|---|")
    table, ratios = [], {}
    for ms in spreads:
        med = {}
        for label, _ in settings:
            rs = runs[ms][label]
            med[label] = {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "p50_s", "p95_s", "ttft_p50_s")}
            med[label]["rows_together"] = max(r["rows_together"] for r in rs)
            m = med[label]
            print(f"| {ms} | {label} (max-batch {dict(settings)[label]}) | {m['tokens_per_s']:.1f} | {m['p50_s']:.2f} | "
                  f"{m['p95_s']:.2f} | {m['ttft_p50_s']:.2f} | {m['rows_together']} |")
        ratios[ms] = med["batched"]["tokens_per_s"] / med["unbatched"]["tokens_per_s"]
        table.append({"spread_ms": ms, **{label: med[label] for label in med}, "ratio": ratios[ms]})
    print("batched / unbatched tokens/s (median): " + ", ".join(f"{ms} ms {r:.2f}x" for ms, r in ratios.items())
          + f" (target >= 3x each); greedy answers identical in every run: {same}")
    if args.json:
        args.json.write_text(json.dumps({"concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds,
                                         "table": table, "runs": {str(k): v for k, v in runs.items()},
                                         "answers_identical": same}, indent=2))
    return 0 if min(ratios.values()) >= 3 and same else 1


if __name__ == "__main__":
    sys.exit(main())
