"""`kit generate` spread over two replicas of one model (`--base-url` given twice).

Two loopback mock servers (tests/mock_openai.py, each in its own process, latency L per request)
serve N requests at concurrency C per replica; the wall time is compared with the bound
N*L/(2C) (target: within 1.15x), beside one replica alone (bound N*L/C), with how the requests
split between the replicas and the most each had in flight.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generate_replicas.py [--n 64 --concurrency 8 --latency 0.25]

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_concurrency import MockProcess, records  # noqa: E402

from kit.generate.replicas import backend_for  # noqa: E402
from kit.generate.runner import run_generation  # noqa: E402


def timed(servers: list[MockProcess], n: int, concurrency: int, out: Path) -> tuple[float, list[int], list[int]]:
    before = [s.stats()["requests"] for s in servers]
    backend = backend_for("openai", "mock", [s.base_url for s in servers])
    start = time.perf_counter()
    summary = run_generation(records(n), out, types="detail", backend=backend, concurrency=concurrency, progress=False,
                             echo=lambda s: None)
    wall = time.perf_counter() - start
    if summary.generated != n:
        raise SystemExit(f"benchmark run lost tasks: {summary}")
    stats = [s.stats() for s in servers]
    return wall, [st["requests"] - b for st, b in zip(stats, before)], [st["max_in_flight"] for st in stats]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight per replica")
    ap.add_argument("--latency", type=float, default=0.25)
    args = ap.parse_args(argv)

    import openai  # noqa: F401  imported up front: a one-off import is not what is being measured

    with MockProcess(args.latency) as a, MockProcess(args.latency) as b, tempfile.TemporaryDirectory(prefix="kit-bench-") as tmp:
        work = Path(tmp)
        timed([a, b], 4, 2, work / "warm")
        one_wall, one_split, _ = timed([a], args.n, args.concurrency, work / "one")
        two_wall, two_split, two_peak = timed([a, b], args.n, args.concurrency, work / "two")

    one_bound = args.n * args.latency / args.concurrency
    two_bound = args.n * args.latency / (2 * args.concurrency)
    ratio = two_wall / two_bound
    ok = ratio <= 1.15 and max(two_peak) <= args.concurrency and min(two_split) > 0
    print(f"kit generate: {args.n} requests, latency {args.latency:g}s, concurrency {args.concurrency} per replica")
    print("| replicas | wall s | bound s | wall / bound | requests per replica | most in flight |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 | {one_wall:.3f} | {one_bound:.3f} (N*L/C) | {one_wall / one_bound:.3f}x | {one_split[0]} | |")
    print(f"| 2 | {two_wall:.3f} | {two_bound:.3f} (N*L/2C) | {ratio:.3f}x | {' / '.join(map(str, two_split))} | "
          f"{' / '.join(map(str, two_peak))} |")
    print(f"two replicas vs one: {one_wall / two_wall:.2f}x faster; target wall <= 1.15 x N*L/(2C): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
