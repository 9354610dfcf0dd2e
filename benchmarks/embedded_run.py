"""The README's main job, `kit adapt --recipe medical` on the embedded mini base, timed from scratch.

Runs the command in a fresh folder (its own `private_data/`, `adapters/` and KIT_CACHE, so the mini
base is built, the sample written and every conversation generated anew), reads the `stage NAME:
seconds, peak` lines kit adapt prints, and measures the whole process's peak resident memory. The
table puts each stage beside the targets (total <= 10 min on 2 cores, peak <= 4 GB) and, with
`--baseline FILE` (a JSON an earlier run wrote with --json), beside that run as a ratio.

    .venv/bin/python benchmarks/embedded_run.py [--json results/embedded_run.json] [--baseline results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_TOTAL_S = 600.0
TARGET_PEAK_GB = 4.0
STAGES = ("base", "sample", "generation", "evaluation before", "checks", "training", "evaluation after")
_LINE = re.compile(r"^stage (?P<name>[a-z ]+): (?P<s>[0-9.]+) s, (?:peak|process peak so far) (?P<gb>[0-9.]+) GB$")
_TABLE = re.compile(r"^(closed accuracy|open recall|overall) +\|")


def run(work: Path) -> dict:
    env = {**os.environ, "KIT_CACHE": str(work / "cache"), "TQDM_DISABLE": "1"}
    kit = Path(sys.executable).with_name("kit")
    start = time.perf_counter()
    proc = subprocess.run([str(kit), "adapt", "--recipe", "medical"], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    # kit resets the kernel's high-water mark at each stage start (for its per-stage peaks), so the
    # child's ru_maxrss is only the last stage's: the run's peak is the largest stage peak.
    child_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    if proc.returncode != 0:
        sys.exit("kit adapt failed:\n" + "\n".join(lines[-30:]))
    stages = {}
    for line in lines:
        m = _LINE.match(line.strip())
        if m:
            stages[m["name"]] = {"seconds": float(m["s"]), "peak_gb": float(m["gb"])}
    table = [l for l in lines if _TABLE.match(l) or l.startswith(("metric", "the overall", "too few"))]
    made = [l for l in lines if l.startswith("conversations:")]
    return {
        "wall_s": wall, "peak_gb": max([child_gb] + [st["peak_gb"] for st in stages.values()]), "stages": stages,
        "table": table + made[-1:],
        "cpus": os.cpu_count(),
    }


def report(now: dict, baseline: dict | None) -> str:
    head = f"{'stage':18} | {'seconds':>8} | {'peak GB':>7}"
    if baseline:
        head += f" | {'baseline s':>10} | {'ratio':>6}"
    rows = [head, "-" * len(head)]
    for name in STAGES:
        st = now["stages"].get(name)
        if st is None:
            continue
        row = f"{name:18} | {st['seconds']:8.1f} | {st['peak_gb']:7.2f}"
        if baseline:
            b = baseline["stages"].get(name)
            row += f" | {b['seconds']:10.1f} | {st['seconds'] / b['seconds']:6.2f}" if b and b["seconds"] else f" | {'-':>10} | {'-':>6}"
        rows.append(row)
    ok_t = "ok" if now["wall_s"] <= TARGET_TOTAL_S else "OVER"
    ok_m = "ok" if now["peak_gb"] <= TARGET_PEAK_GB else "OVER"
    rows.append(f"{'total (wall)':18} | {now['wall_s']:8.1f} | {now['peak_gb']:7.2f}"
                + (f" | {baseline['wall_s']:10.1f} | {now['wall_s'] / baseline['wall_s']:6.2f}" if baseline else ""))
    rows.append(f"targets: total <= {TARGET_TOTAL_S / 60:.0f} min ({ok_t}: {now['wall_s'] / 60:.1f} min), "
                f"peak <= {TARGET_PEAK_GB:.0f} GB ({ok_m}: {now['peak_gb']:.2f} GB resident, the largest stage's) "
                f"on {now['cpus']} CPUs")
    if baseline:
        rows.append(f"baseline peak {baseline['peak_gb']:.2f} GB -> {now['peak_gb']:.2f} GB ({now['peak_gb'] / baseline['peak_gb']:.2f}x)")
    rows += ["", *now["table"]]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write this run's numbers here")
    ap.add_argument("--baseline", type=Path, help="an earlier run's --json, shown side by side")
    ap.add_argument("--work", type=Path, help="run in this (new) folder instead of a temporary one")
    args = ap.parse_args()
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if args.work:
        if args.work.exists():
            sys.exit(f"--work {args.work} exists; the run needs a new folder (it measures a run from scratch)")
        args.work.mkdir(parents=True)
        now = run(args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="kit-embedded-") as tmp:
            now = run(Path(tmp))
    print(report(now, baseline))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(now, indent=1) + "\n")


if __name__ == "__main__":
    main()
