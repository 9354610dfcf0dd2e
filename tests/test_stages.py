"""Per-stage time and memory lines (kit adapt prints them; benchmarks/embedded_run.py reads them)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from kit.adapt import generation_line
from kit.core.stages import Stages, peak_rss_bytes


def test_each_stage_prints_its_time_and_its_own_peak():
    lines: list[str] = []
    stages = Stages(echo=lines.append)
    with stages.stage("big"):
        block = np.ones(300_000_000 // 8)  # 300 MB, touched
        block += 1
        time.sleep(0.05)
    del block
    with stages.stage("small"):
        time.sleep(0.01)
    (name1, s1, p1), (name2, s2, p2) = stages.done
    assert (name1, name2) == ("big", "small") and s1 >= 0.05 and s2 >= 0.01
    assert all(re.fullmatch(r"stage (big|small): [0-9.]+ s, (peak|process peak so far) [0-9.]+ GB", l) for l in lines)
    if "process peak so far" not in lines[0]:  # Linux: peaks are per stage
        assert p1 - p2 > 200e6, "the freed 300 MB must not count against the next stage"
    assert stages.total() == pytest.approx(s1 + s2)
    assert peak_rss_bytes() > 0


def test_a_failed_stage_prints_nothing_and_raises():
    lines: list[str] = []
    stages = Stages(echo=lines.append)
    with pytest.raises(ValueError):
        with stages.stage("boom"):
            raise ValueError("x")
    assert lines == [] and stages.done == []


def test_generation_line_counts_every_rejection_reason():
    line = generation_line(7, {"truncated": 1, "repeated question": 8}, {})
    assert line == "conversations: 7 generated, 9 rejected (8 repeated question, 1 truncated), 0 failed"
    assert generation_line(3, {}, {"timeout": 2}) == "conversations: 3 generated, 0 rejected, 2 failed"
