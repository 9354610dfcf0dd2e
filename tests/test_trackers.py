"""`train.report_to`: tensorboard (default), wandb and mlflow write their files into the run folder
offline, none writes nothing extra; all without a connection leaving the machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny
from kit.core.recipes import load_recipe
from kit.train.run import train

TINY = tiny(train__batch_size=2, train__global_batch_size=2, train__max_steps=4, train__lr="1e-2")


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


def wandb_records(path: Path) -> list:
    """Every record of a wandb run file, decoded with wandb's own protobuf message (`Record`).

    The file is a LevelDB-style log (what wandb's writer produces): a 7-byte header (`:W&B`, magic,
    version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last); a chunk header never straddles a block, the tail of a block too
    short for one is padding.
    """
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if length == 0 and kind == 0:
            break
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            records.append(rec)
    return records


def _wandb_run(out: Path) -> tuple[set[int], set[float]]:
    """The logged steps and losses of the one offline run in `out`."""
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb folder"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    steps, losses = set(), set()
    for rec in wandb_records(logs[0]):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.history.item}
        if "train/loss" in row:
            steps.add(int(row["train/global_step"]))
            losses.add(float(row["train/loss"]))
    return steps, losses


def test_wandb_writes_an_offline_run_locally(tiny_base, shapes, tmp_path, clean_env, no_connect):
    steps, losses = _wandb_run(_run(tiny_base, shapes, tmp_path, "wandb"))
    assert steps == {1, 2, 3, 4} and len(losses) >= 4, (steps, losses)


WANDB_IN_NAMESPACE = r"""
import subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # loopback only: nothing else exists here
from kit.core.recipes import load_recipe
from kit.train.run import train
base, data, out, *sets = sys.argv[1:]
train(load_recipe("llava15-pretrain", sets), base=base, data=data, out=out, echo=lambda m: None)
"""


def test_wandb_offline_needs_no_network_at_all(tiny_base, shapes, tmp_path, clean_env):
    """wandb's client hands the run to its own service process (not Python, so the socket guard
    above cannot see it): in a network namespace with loopback alone the run is written just the same."""
    if shutil.which("unshare") is None or shutil.which("ip") is None or subprocess.run(
            ["unshare", "-n", "true"], check=False, capture_output=True).returncode != 0:
        pytest.skip("unshare -n / ip are not available here (need root or user namespaces, and iproute2)")
    out = tmp_path / "wandb-netns"
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", WANDB_IN_NAMESPACE, str(tiny_base), shapes["pretrain"], str(out),
                        *TINY, "train.report_to=wandb"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    steps, losses = _wandb_run(out)
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
