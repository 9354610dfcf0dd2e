"""Each fact resolved once per command: the base's config.json is read by kit once over a whole
`kit finetune` and a whole `kit export ADAPTER` (merge and verification included), and the loads
that follow are handed the config kit read instead of reading it again."""

from __future__ import annotations

import builtins
import io
import traceback
from pathlib import Path

import pytest

from tests.helpers import as_flags, run_cli, tiny


class Reads:
    """Every open() of one file in this process, split by who opened it: kit itself, or a library
    kit called (transformers' processor loading reads config.json to learn the model type)."""

    def __init__(self, target: Path):
        self.target = target.resolve()
        self.by_kit: list[str] = []
        self.by_libraries: list[str] = []

    def spy(self, real):
        def opened(file, *args, **kwargs):
            if isinstance(file, (str, Path)) and Path(file).resolve() == self.target:
                frames = [f for f in traceback.extract_stack()[:-1] if "/kit/" in f.filename or "site-packages" in f.filename]
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-8:]))
                # The innermost frame that is not the standard library decides: kit's own module or a library's.
                (self.by_kit if "/kit/" in frames[-1].filename else self.by_libraries).append(where)
            return real(file, *args, **kwargs)

        return opened

    def clear(self) -> None:
        self.by_kit.clear()
        self.by_libraries.clear()


@pytest.fixture
def reads(tiny_base, monkeypatch) -> Reads:
    counter = Reads(Path(tiny_base) / "config.json")
    monkeypatch.setattr(builtins, "open", counter.spy(builtins.open))
    monkeypatch.setattr(io, "open", counter.spy(io.open))
    return counter


def test_finetune_and_export_read_the_base_config_once(tiny_base, shapes, tmp_path, capsys, reads):
    adapter = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", shapes["instruct"],
                           "--out", str(adapter), "--max-steps", "1", *as_flags(tiny(lora=True)))
    assert code == 0, err
    assert len(reads.by_kit) == 1, reads.by_kit
    # Before: kit 5 (plan, dataset, model load, two card fingerprints), transformers 3 (one of them the
    # model load, now handed kit's config). What remains is AutoProcessor finding the model type.
    assert len(reads.by_libraries) <= 2, reads.by_libraries
    finetune = (len(reads.by_kit), len(reads.by_libraries))

    reads.clear()
    code, _, err = run_cli(capsys, "export", str(adapter), "--out", str(tmp_path / "export"))
    assert code == 0, err
    assert len(reads.by_kit) == 1, reads.by_kit
    assert reads.by_libraries == [], reads.by_libraries  # before: kit 6, transformers 2
    print(f"config.json reads (kit, libraries): finetune {finetune}, export ADAPTER {(len(reads.by_kit), len(reads.by_libraries))}")
