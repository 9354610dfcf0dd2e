"""How close `kit generate` gets to ideal concurrency against a slow OpenAI-compatible server.

Runs the real engine (run_generation: prompts, retries machinery, fsynced ledger, final files)
against the loopback mock (tests/mock_openai.py, in its own process) with a fixed latency per request, then compares:

- wall time at concurrency C with the ideal N*L/C (target <= 1.15x), and
- with a sequential run (concurrency 1, on fewer requests, scaled to N) (target >= 10x faster).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generate_concurrency.py [--n 64 --concurrency 16 --latency 0.25]

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kit.generate.backends import OpenAIBackend
from kit.ingest.records import Record
from kit.generate.runner import run_generation


def records(n: int) -> list[Record]:
    return [Record(id=f"bench{i:05d}", image=f"{i}.png", root=Path("/nonexistent/images"),
                   captions=[f"A red bus number {i} waits at a stop while people board."]) for i in range(n)]


class MockProcess:
    """The mock server in its own process, as a real server would be: it does not share our GIL."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "mock_openai.py"), "--port", "0", "--latency", str(latency)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise SystemExit(f"mock server did not start: {line!r}")
        self.base_url = line.split()[-1]

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/stats", timeout=5) as r:
            return json.load(r)

    def __enter__(self) -> MockProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def timed_run(server: MockProcess, n: int, concurrency: int, work: Path) -> tuple[float, int]:
    out = work / f"c{concurrency}-n{n}"
    before = server.stats()["requests"]
    start = time.perf_counter()
    summary = run_generation(records(n), out, types="detail", backend=OpenAIBackend("mock", base_url=server.base_url),
                             concurrency=concurrency, progress=False, echo=lambda s: None)
    wall = time.perf_counter() - start
    if summary.generated != n:
        raise SystemExit(f"benchmark run lost tasks: {summary}")
    return wall, server.stats()["requests"] - before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="requests in the concurrent run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.25, help="server seconds per request")
    ap.add_argument("--n-seq", type=int, default=12, help="requests in the sequential run (scaled to --n)")
    args = ap.parse_args(argv)

    import openai  # noqa: F401  imported up front: a one-off import is not what is being measured

    with MockProcess(args.latency) as server, tempfile.TemporaryDirectory(prefix="kit-bench-") as tmp:
        work = Path(tmp)
        timed_run(server, 2, 2, work)  # warm-up: prompt files, client construction, first connections
        wall, requests = timed_run(server, args.n, args.concurrency, work)
        seq_wall, seq_requests = timed_run(server, args.n_seq, 1, work)
        max_in_flight = server.stats()["max_in_flight"]

    ideal = args.n * args.latency / args.concurrency
    seq_scaled = seq_wall * args.n / args.n_seq
    bound_ratio = wall / ideal
    speedup = seq_scaled / wall
    ok_bound, ok_speed = bound_ratio <= 1.15, speedup >= 10

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kit generate: {args.n} requests, latency {args.latency:g}s, concurrency {args.concurrency}")
    for col in ("measure", "value", "target", "met"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row("wall time (concurrent)", f"{wall:.3f}s", "", "")
    table.add_row("ideal N*L/C", f"{ideal:.3f}s", "", "")
    table.add_row("wall / ideal", f"{bound_ratio:.3f}x", "<= 1.15x", "yes" if ok_bound else "NO")
    table.add_row(f"sequential ({args.n_seq} requests)", f"{seq_wall:.3f}s", "", "")
    table.add_row(f"sequential scaled to {args.n}", f"{seq_scaled:.3f}s", "", "")
    table.add_row("speed-up vs sequential", f"{speedup:.1f}x", ">= 10x", "yes" if ok_speed else "NO")
    table.add_row("server max in flight", str(max_in_flight), f"<= {args.concurrency}", "yes" if max_in_flight <= args.concurrency else "NO")
    table.add_row("requests (concurrent / sequential)", f"{requests} / {seq_requests}", "", "")
    Console().print(table)
    return 0 if ok_bound and ok_speed and max_in_flight <= args.concurrency else 1


if __name__ == "__main__":
    sys.exit(main())
