"""kill -9 during `kit adapt`, then the same command with `--resume`: the same adapter as an
uninterrupted run (within fp tolerance), with the generated data reused rather than regenerated.

One data folder and one mock OpenAI server (deterministic: a reply depends only on its request) are
shared by both runs, so run B's `prepare_data` finds run A's ledger complete and rebuilds the same
train.json. Each run is a real `python -m kit adapt` process; B is SIGKILLed (its whole process
group) as soon as its first checkpoint is complete. Three micro-batches per optimizer step make
the six steps left after it (plus the checkpoint saves, the final save and the after-evaluation)
take seconds, so the poll below always lands the kill mid-training.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mock_openai import MockOpenAI
from test_adapt import TINY, _folder

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE = 8, 2


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "KIT_CACHE": str(tmp_path / "kit-cache"), "TQDM_DISABLE": "1", "TORCHDYNAMO_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _adapt_cmd(base: Path, data: Path, out: Path, url: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "kit", "adapt", "--recipe", "medical", "--base", str(base), "--data", str(data),
            "--out", str(out), "--max-steps", str(STEPS), *TINY,
            "--set", "train.global_batch_size=6", "--set", f"train.save_steps={SAVE}", "--set", "train.save_total_limit=10",
            "--set", "train.logging_steps=1",
            "--set", "generate.backend=openai", "--set", f"generate.base_url={url}", "--set", "generate.model=mock",
            "--set", "eval.held_out=0.25", *(["--resume"] if resume else [])]


def _run(cmd: list[str], tmp_path: Path, log: Path, timeout: float = 120) -> None:
    with open(log, "wb") as fh:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=_env(tmp_path), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _complete_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoints whose save finished: the card is written (atomically) after the trainer state."""
    return sorted(int(p.parent.name.split("-")[-1]) for p in out.glob("checkpoint-*/kit.json"))


def _log_steps(out: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad_norm) rows; a resumed run appends to the same file."""
    with open(out / "log.csv") as fh:
        return [(int(r["step"]), float(r["loss"]), float(r["grad_norm"])) for r in csv.DictReader(fh)]


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-4 * max(1.0, abs(y))


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_kill_9_during_adapt_then_resume_gives_the_uninterrupted_adapter(tmp_path, tiny_base):
    data = _folder(tmp_path)
    work = data / ".kit" / "medical"
    a, b = tmp_path / "A", tmp_path / "B"
    with MockOpenAI() as server:  # vary=True: the reply is a hash of the request, the same every run
        # Run A: uninterrupted. It also generates the data (ledger + train.json) that B reuses.
        _run(_adapt_cmd(tiny_base, data, a, server.base_url), tmp_path, tmp_path / "A.log")
        requests_after_a = server.stats()["requests"]
        assert requests_after_a > 0
        train_json = (work / "train.json").read_bytes()

        # Run B: killed with SIGKILL (the whole process group) once its first checkpoint is complete.
        with open(tmp_path / "B-killed.log", "wb") as log_b:
            proc = subprocess.Popen(_adapt_cmd(tiny_base, data, b, server.base_url), cwd=REPO, env=_env(tmp_path),
                                    stdout=log_b, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and proc.poll() is None and not _complete_checkpoints(b):
                    time.sleep(0.005)
                alive = proc.poll() is None
                os.killpg(proc.pid, signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        assert alive, "run B ended before it could be killed:\n" + (tmp_path / "B-killed.log").read_text()[-4000:]
        assert proc.returncode == -signal.SIGKILL
        done = _complete_checkpoints(b)
        assert done, "no complete checkpoint before the deadline:\n" + (tmp_path / "B-killed.log").read_text()[-4000:]
        resume_from = max(p for p in (int(c.name.split("-")[-1]) for c in b.glob("checkpoint-*")))
        assert not (b / "adapter_model.safetensors").exists() and not (b / "kit.json").exists(), "killed after it finished"
        assert resume_from < STEPS, f"killed too late (checkpoint-{resume_from}): nothing left to resume"
        rows_at_kill = len(_log_steps(b))

        # The same command with --resume, to completion.
        _run(_adapt_cmd(tiny_base, data, b, server.base_url, resume=True), tmp_path, tmp_path / "B-resumed.log")
        assert server.stats()["requests"] == requests_after_a, "resume regenerated data instead of reusing the ledger"
    assert (work / "train.json").read_bytes() == train_json, "resume rebuilt a different training set"

    log_a = {step: (loss, grad) for step, loss, grad in _log_steps(a)}
    log_b = _log_steps(b)
    # Before the kill B is just a second run of A's command: any difference here is not the resume's
    # fault but a training run that does not reproduce itself (e.g. an unseeded LoRA init).
    for step, loss, grad in log_b[:rows_at_kill]:
        assert _close(loss, log_a[step][0]) and _close(grad, log_a[step][1]), (
            f"two runs of the same `kit adapt` command differ at step {step} before any kill/resume: "
            f"(loss, grad_norm) {(loss, grad)} vs {log_a[step]}")
    # The resume continued from the checkpoint (not from step 0) and retraced A's steps.
    resumed = log_b[rows_at_kill:]
    assert [s for s, _, _ in resumed] == list(range(resume_from + 1, STEPS + 1)), (resume_from, resumed)
    for step, loss, grad in resumed:
        assert _close(loss, log_a[step][0]) and _close(grad, log_a[step][1]), (step, (loss, grad), log_a[step])

    card_a, card_b = (json.loads((p / "kit.json").read_text()) for p in (a, b))
    assert card_a["kind"] == card_b["kind"] == "adapter"
    assert card_a["steps"] == card_b["steps"] == STEPS
    assert card_b["data"]["sha256"] == card_a["data"]["sha256"]
    assert "evaluation" in card_b

    ta, tb = _adapter(a), _adapter(b)
    assert set(ta) == set(tb) and ta
    worst = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    assert worst < 1e-5, worst
    # It trained at all after the resume: the final adapter is not the checkpoint it resumed from.
    first = _adapter(b / f"checkpoint-{resume_from}")
    assert max((first[k].float() - tb[k].float()).abs().max().item() for k in tb if k in first) > 0
