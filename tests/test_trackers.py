"""`train.report_to`: tensorboard (default), wandb and mlflow write their files into the run folder
offline, none writes nothing extra; all without a connection leaving the machine."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kit.core.recipes import load_recipe
from kit.train.run import train

TINY = [
    "train.batch_size=2", "train.global_batch_size=2", "train.precision=fp32", "train.gradient_checkpointing=false",
    "train.num_workers=0", "train.logging_steps=1", "train.save_steps=1000", "data.max_length=256", "train.warmup_ratio=0",
    "train.max_steps=4", "train.lr=1e-2",
]


@pytest.fixture
def no_connect(monkeypatch):
    """Connections off this machine are refused and recorded (wandb's client talks to its own
    service process over a Unix socket: that stays allowed, as does loopback)."""
    import ipaddress
    import socket

    attempts: list = []
    real = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX or ipaddress.ip_address(address[0]).is_loopback:
            return real(self, address)
        attempts.append(address)
        raise OSError(f"test: connection to {address} refused")

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts
    assert attempts == [], f"connections off the machine: {attempts}"


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        os.environ.pop(k, None)


def _run(tiny_base, shapes, tmp_path, tracker: str) -> Path:
    recipe = load_recipe("llava15-pretrain", TINY + [f"train.report_to={tracker}"])
    return train(recipe, base=str(tiny_base), data=shapes["pretrain"], out=str(tmp_path / tracker), echo=lambda m: None)


def test_tensorboard_is_the_default_and_writes_event_files(tiny_base, shapes, tmp_path, clean_env, no_connect):
    assert load_recipe("llava15-pretrain").train.report_to == "tensorboard"
    out = _run(tiny_base, shapes, tmp_path, "tensorboard")
    assert list(out.rglob("events.out.tfevents.*"))


def test_wandb_writes_an_offline_run_locally(tiny_base, shapes, tmp_path, clean_env, no_connect):
    out = _run(tiny_base, shapes, tmp_path, "wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb folder"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    # The run's records (protobuf, values as JSON text): each logged step's number and loss.
    raw = logs[0].read_bytes()
    steps = {int(m.group(1)) for m in re.finditer(rb"global_step\x82\x01.([0-9]+)", raw)}
    losses = {float(m.group(1)) for m in re.finditer(rb"loss\x82\x01.([0-9.eE+-]+)", raw)}
    assert steps == {1, 2, 3, 4} and len(losses) >= 4, (steps, losses)


def test_mlflow_writes_a_local_file_store(tiny_base, shapes, tmp_path, clean_env, no_connect):
    out = _run(tiny_base, shapes, tmp_path, "mlflow")
    losses = list((out / "mlruns").glob("*/*/metrics/loss"))
    assert len(losses) == 1, list((out / "mlruns").rglob("*"))[:20]
    steps = [int(line.split()[2]) for line in losses[0].read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_none_writes_no_tracker_files(tiny_base, shapes, tmp_path, clean_env, no_connect):
    out = _run(tiny_base, shapes, tmp_path, "none")
    assert not list(out.rglob("events.out.tfevents.*")) and not (out / "wandb").exists() and not (out / "mlruns").exists()
    assert len((out / "log.csv").read_text().splitlines()) == 5  # kit's own log still has every step


def test_an_unknown_tracker_is_named():
    from kit.core.errors import KitError

    with pytest.raises(KitError, match="report_to"):
        load_recipe("llava15-pretrain", ["train.report_to=comet"])
