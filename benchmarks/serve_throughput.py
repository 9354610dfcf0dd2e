"""`kit serve` with batching vs one request at a time, on the embedded mini base, CPU.

C concurrent clients (OpenAI's async client) each ask for N new tokens (greedy, an image each);
the same server answers first unbatched (--max-batch 1: one generate per request, as before
batching), then batched (--max-batch C). Printed side by side: completion tokens/s over the
burst, p50 / p95 request latency, and how many generate calls ran. Target: batched tokens/s at
least 3x unbatched.

    .venv/bin/python benchmarks/serve_throughput.py [--concurrency 8 --tokens 64 --rounds 2] [--json out.json]

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


async def burst(url: str, model: str, concurrency: int, tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=600)

    async def one(i: int):
        t0 = time.perf_counter()
        r = await client.chat.completions.create(
            model=model, temperature=0, max_tokens=tokens,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(i)}},
                                                   {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}])
        return time.perf_counter() - t0, r.usage.completion_tokens, r.choices[0].message.content

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*[one(i) for i in range(concurrency)])
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    completion = sum(r[1] for r in results)
    return {"wall_s": wall, "completion_tokens": completion, "tokens_per_s": completion / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "answers": [r[2] for r in results]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="bursts per setting (the best is kept)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base = mini_base()
    pool = load_pool(base, [], echo=lambda m: None, max_batch=args.concurrency)
    model = pool.names[0]
    app = create_app(pool, max_tokens_limit=max(1024, args.tokens))
    rows = {}
    with running(app) as url:
        asyncio.run(burst(url, model, 2, 4))  # warm-up: first-call costs are nobody's throughput
        for label, max_batch in (("unbatched (max-batch 1)", 1), (f"batched (max-batch {args.concurrency})", args.concurrency)):
            pool.batcher.max_batch = max_batch
            best = None
            for _ in range(args.rounds):
                calls = pool.batcher.batches
                r = asyncio.run(burst(url, model, args.concurrency, args.tokens))
                r["generate_calls"] = pool.batcher.batches - calls
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    best = r
            rows[label] = best
    (unb, unb_r), (bat, bat_r) = rows.items()
    same = unb_r["answers"] == bat_r["answers"]
    ratio = bat_r["tokens_per_s"] / unb_r["tokens_per_s"]
    print(f"kit serve, mini base ({base}), CPU: {args.concurrency} concurrent requests x {args.tokens} new tokens, greedy, one image each")
    print("| setting | tokens/s | completion tokens | wall s | p50 s | p95 s | generate calls |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['tokens_per_s']:.1f} | {r['completion_tokens']} | {r['wall_s']:.2f} | {r['p50_s']:.2f} | "
              f"{r['p95_s']:.2f} | {r['generate_calls']} |")
    print(f"batched / unbatched tokens/s: {ratio:.2f}x (target >= 3x); p50 latency {unb_r['p50_s'] / bat_r['p50_s']:.2f}x lower; "
          f"greedy answers identical: {same}")
    if args.json:
        args.json.write_text(json.dumps({"concurrency": args.concurrency, "tokens": args.tokens, "rows": rows,
                                         "ratio": ratio, "answers_identical": same}, indent=2))
    return 0 if ratio >= 3 and same else 1


if __name__ == "__main__":
    sys.exit(main())
