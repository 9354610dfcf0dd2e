"""Run a benchmark script as on the lent GPU machine, where some of kit's dependencies are absent."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runner(script: Path, absent: tuple[str, ...]) -> str:
    """Python source for `python -c`: runs `script` with its argv while importing any of `absent`
    fails, so a script that needs a package the GPU machine lacks fails here first."""
    return f"""
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {tuple(absent)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
        return None
sys.meta_path.insert(0, Absent())
sys.argv = [{str(script)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
