"""The embedded mini base: real weights from pip packages, offline, and it really sees.

The default suite checks the build and the shipped stage-1 projector (kit/assets); the slow suite
(`pytest -m slow`) reproduces that projector with `kit base align-mini` from scratch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kit.base.mini import ALIGNED_PROJECTOR, mini_base

# Thresholds well above chance (colour 20%, shape 25%, position 20%) and below what the shipped
# projector measured (see kit/assets/README.md), so noise in 60 images does not flake.
MIN_ACCURACY = {"colour": 0.35, "shape": 0.70, "position": 0.40}


@pytest.fixture(scope="module")
def aligned_mini():
    return mini_base(aligned=True)


def test_mini_base_builds_offline_and_loads_without_kit(aligned_mini):
    code = f"""
import sys
from transformers import AutoModelForImageTextToText, AutoProcessor
m = AutoModelForImageTextToText.from_pretrained({str(aligned_mini)!r})
p = AutoProcessor.from_pretrained({str(aligned_mini)!r})
assert not any(k == "kit" or k.startswith("kit.") for k in sys.modules)
print(type(m).__name__, sum(x.numel() for x in m.parameters()), m.config.image_seq_length)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    name, n_params, n_image = r.stdout.split()
    assert name == "FastVlmForConditionalGeneration" and 130e6 < int(n_params) < 150e6 and int(n_image) == 49
    card = json.loads((aligned_mini / "kit.json").read_text())
    assert card["settings"]["aligned_projector"]


def test_shipped_projector_makes_the_mini_base_see(aligned_mini):
    from kit.train.mini_align import evaluate_mini

    assert ALIGNED_PROJECTOR.is_file()
    acc = evaluate_mini(aligned_mini, 60, echo=lambda m: None)
    for k, floor in MIN_ACCURACY.items():
        assert acc[k] >= floor, (k, acc)


@pytest.mark.slow
def test_align_mini_reproduces_the_shipped_projector_quality(tmp_path):
    from kit.train.mini_align import align_mini

    acc = align_mini(tmp_path / "work", echo=print)
    for k, floor in MIN_ACCURACY.items():
        assert acc[k] >= floor, (k, acc)
