"""`kit review`: decisions on disk (append-only, fsynced, torn tail ignored), the one rule for what
trains (export, kit finetune / kit adapt on a reviewed folder), the API's safety checks, and a
server killed with SIGKILL that loses nothing it acknowledged. The page itself is driven in a
browser in test_review_page.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mock_openai import MockOpenAI
from helpers import as_flags, run_cli, tiny
from test_grounding import _reply

from kit.core.errors import KitError
from kit.data.reviewed import Decision, ReviewLog, fingerprint, reviewed_samples

STREET, KITCHEN = "images_street", "images_kitchen"


def draw_manifest(root: Path) -> Path:
    """Two drawn scenes with captions and boxes (pixels), as a user's manifest folder holds them."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    street = Image.new("RGB", (320, 240), (196, 206, 214))
    d = ImageDraw.Draw(street)
    d.rectangle([0, 200, 320, 240], fill=(90, 90, 96))
    for x in (16, 96):
        d.ellipse([x + 16, 40, x + 48, 72], fill=(230, 190, 160))
        d.rectangle([x + 12, 72, x + 52, 200], fill=(60, 90, 160))
    d.rectangle([32, 170, 96, 200], fill=(120, 80, 40))
    d.rectangle([192, 100, 312, 180], fill=(180, 30, 40))
    street.save(root / "images" / "street.png")
    kitchen = Image.new("RGB", (320, 240), (235, 225, 200))
    d = ImageDraw.Draw(kitchen)
    d.rectangle([0, 120, 320, 240], fill=(140, 100, 60))
    d.ellipse([80, 80, 240, 160], fill=(250, 250, 250))
    kitchen.save(root / "images" / "kitchen.png")
    lines = [
        {"image": "images/street.png", "captions": ["Two people walk a dog past a parked car."],
         "boxes": [{"label": "person", "bbox": [16, 40, 80, 200]}, {"label": "person", "bbox": [96, 40, 160, 200]},
                   {"label": "dog", "bbox": [32, 160, 96, 200]}, {"label": "car", "bbox": [192, 80, 312, 200]}]},
        {"image": "images/kitchen.png", "captions": ["A bowl of fruit on a kitchen table."],
         "boxes": [{"label": "bowl", "bbox": [80, 80, 240, 160]}, {"label": "dining table", "bbox": [0, 120, 320, 240]}]},
    ]
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def generated_folder(root: Path) -> Path:
    """`kit generate` on the drawn manifest against the mock model: the kitchen's two conversations
    kept, the street's two rejected by the claim check (test_grounding's injected claims)."""
    src = draw_manifest(root / "src")
    out = root / "gen"
    with MockOpenAI(reply_for=_reply) as server:
        proc = subprocess.run([sys.executable, "-m", "kit", "generate", "--source", "manifest", "--input", str(src), "--out",
                               str(out), "--backend", "openai", "--base-url", server.base_url, "--model", "mock", "--types",
                               "conversation,detail"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return generated_folder(tmp_path_factory.mktemp("review"))


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    """A fresh copy per test (decisions are appended to the folder)."""
    import shutil

    dest = tmp_path / "gen"
    shutil.copytree(pristine, dest)
    shutil.copytree(pristine.parent / "src", tmp_path / "src")
    card = json.loads((dest / "kit.json").read_text())
    card["image_folder"] = str(tmp_path / "src")
    (dest / "kit.json").write_text(json.dumps(card))
    return dest


def _rejects(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (folder / "rejects.jsonl").read_text().splitlines())}


def test_generate_keeps_sources_and_whole_rejects_for_the_reviewer(pristine):
    data = json.loads((pristine / "data.json").read_text())
    assert [s["id"] for s in data] == [f"{KITCHEN}-conversation", f"{KITCHEN}-detail"]
    rejects = _rejects(pristine)
    assert set(rejects) == {f"{STREET}-conversation", f"{STREET}-detail"}
    for r in rejects.values():  # whole, in data.json's form, so a rescue trains as written
        assert r["image"] == "images/street.png" and r["type"] in ("conversation", "detail") and r["conversations"]
        for c in r["claims"]:
            answer = [t["value"] for t in r["conversations"] if t["from"] == "gpt"][c["answer"]]
            assert answer[c["start"]:c["end"]] == c["text"]
    sources = {s["id"]: s for s in map(json.loads, (pristine / "sources.jsonl").read_text().splitlines())}
    assert sources[STREET]["captions"] == ["Two people walk a dog past a parked car."]
    assert [b["label"] for b in sources[STREET]["boxes"]] == ["person", "person", "dog", "car"]
    assert sources[STREET]["boxes"][3]["bbox"] == pytest.approx([0.6, 1 / 3, 0.975, 5 / 6], abs=1e-3)
    assert sorted(sources[STREET]["samples"]) == [f"{STREET}-conversation", f"{STREET}-detail"]
    assert "root" not in sources[STREET] and sources[STREET]["image"] == "images/street.png"


def test_the_log_is_append_only_and_a_torn_last_line_is_ignored(tmp_path):
    log = ReviewLog(tmp_path)
    log.append(Decision("a", "accept", time="t1"))
    log.append(Decision("b", "reject", reason="never in the report", time="t2"))
    log.append(Decision("a", "reject", time="t3"))
    assert {k: (d.decision, n) for k, (d, n) in log.read().items()} == {"a": ("reject", 3), "b": ("reject", 2)}
    with open(log.path, "ab") as fh:  # a kill in the middle of a write
        fh.write(b'{"id": "c", "decision": "acc')
    assert set(log.read()) == {"a", "b"}
    log.append(Decision("c", "edit", conversations=[{"from": "gpt", "value": "x"}], time="t4"))
    lines = log.path.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["id"] == "c"  # the torn piece was cut, nothing else
    assert log.read()["c"][0].conversations == [{"from": "gpt", "value": "x"}]
    log.path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(KitError, match=r"review\.jsonl:2: not a decision line"):
        log.read()
    log.path.write_text('{"id": "a", "decision": "maybe"}\n')
    with pytest.raises(KitError, match=r"review\.jsonl:1: field 'decision' must be one of accept, reject, edit"):
        log.read()


def _edit_of(sample: dict, answer: str) -> list[dict]:
    turns = [dict(t) for t in sample["conversations"]]
    next(t for t in turns if t["from"] == "gpt")["value"] = answer
    return turns


def test_export_is_exactly_what_the_decisions_say(folder, tmp_path, capsys):
    data = json.loads((folder / "data.json").read_text())
    rejects = _rejects(folder)
    conv, detail = data
    rescued = rejects[f"{STREET}-detail"]
    fixed = _edit_of(rescued, "Two people walk a dog along a street, past a parked car.")
    unreviewed = reviewed_samples(folder)  # nobody has looked yet: data.json as generated
    assert unreviewed.samples == data and not unreviewed.counts.reviewed and "none yet" in unreviewed.counts.line()
    log = ReviewLog(folder)
    log.append(Decision(conv["id"], "accept", of=fingerprint(conv["conversations"])))
    log.append(Decision(detail["id"], "reject", reason="too vague"))
    log.append(Decision(rescued["id"], "edit", conversations=fixed))
    log.append(Decision("gone-detail", "accept"))  # an id not in the folder

    out = tmp_path / "train" / "reviewed.json"
    code, stdout, err = run_cli(capsys, "review", str(folder), "--export", str(out))
    assert code == 0, err
    expected = [conv, {"id": rescued["id"], "image": rescued["image"], "conversations": fixed, "type": rescued["type"]}]
    assert json.loads(out.read_text()) == expected
    assert "1 accepted, 1 edited, 1 rejected, 0 undecided (excluded); 1 rescued" in err and "1 decisions name ids not in" in err
    card = json.loads((out.parent / "kit.json").read_text())
    assert card["kind"] == "data" and Path(card["image_folder"]) == (tmp_path / "src").resolve()
    assert card["review"]["accepted"] == 1 and card["review"]["edited"] == 1
    assert json.loads((folder / "data.json").read_text()) == data  # never modified

    # Undecided: excluded by default, included on request; a rejected-by-check one stays out.
    log.append(Decision(detail["id"], "accept"))
    log.append(Decision(conv["id"], "reject"))
    r = reviewed_samples(folder, "include")
    assert [s["id"] for s in r.samples] == [detail["id"], rescued["id"]]
    log.path.write_text(json.dumps(Decision(conv["id"], "accept").to_json()) + "\n")
    assert [s["id"] for s in reviewed_samples(folder, "include").samples] == [conv["id"], detail["id"]]
    assert [s["id"] for s in reviewed_samples(folder).samples] == [conv["id"]]

    # A decision about a conversation since generated anew does not carry over.
    log.path.write_text(json.dumps(Decision(conv["id"], "accept", of="0" * 16).to_json()) + "\n")
    r = reviewed_samples(folder)
    assert r.samples == [] and r.counts.stale == 1 and r.counts.undecided == 2

    # Existing file: refused without --force; one-line errors for what cannot be exported.
    code, _, err = run_cli(capsys, "review", str(folder), "--export", str(out))
    assert code != 0 and err.count("\n") == 1 and "already exists" in err and "--force" in err
    code, _, err = run_cli(capsys, "review", str(tmp_path / "src"), "--export", str(tmp_path / "x.json"))
    assert code != 0 and err.count("\n") == 1 and "no data.json" in err
    code, _, err = run_cli(capsys, "review", str(folder), "--export", str(folder / "data.json"), "--force")
    assert code != 0 and "never changes" in err
    code, _, err = run_cli(capsys, "review", str(folder), "--export", str(tmp_path / "y.json"), "--undecided", "maybe")
    assert code != 0 and err.count("\n") == 1 and "undecided 'maybe'" in err and not (tmp_path / "y.json").exists()


def test_an_edit_must_fit_its_conversation(folder, capsys):
    sample = json.loads((folder / "data.json").read_text())[0]
    log = ReviewLog(folder)
    cases = [
        (sample["conversations"][:2], "has 2 turns and the generated conversation 6"),
        ([{**t, "from": "gpt"} for t in sample["conversations"]], "conversations[0].from is 'gpt'"),
        ([{**t, "value": t["value"].replace("<image>", "")} for t in sample["conversations"]], "lost its <image> placeholder"),
        ([{**t, "value": ""} if i == 1 else t for i, t in enumerate(sample["conversations"])], "conversations[1].value must be non-empty"),
    ]
    for turns, message in cases:
        log.path.write_text(json.dumps({"id": sample["id"], "decision": "edit", "conversations": turns}) + "\n")
        code, _, err = run_cli(capsys, "review", str(folder), "--export", str(folder / "out.json"), "--force")
        assert code != 0 and err.count("\n") == 1 and "review.jsonl:1" in err and message in err, err
        assert not (folder / "out.json").exists()


# ------------------------------------------------------------------ the API, in process


def _call(url: str, path: str, body=None, headers=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def api(folder):
    from kit.core.http import LOOPBACK_NAMES, running
    from kit.review.app import create_app
    from kit.review.folder import ReviewFolder

    review = ReviewFolder(folder)
    app = create_app(review, hosts=set(LOOPBACK_NAMES), token="tok")
    with running(app) as url:
        yield url, review


JSON_TOK = {"X-Kit-Token": "tok", "Content-Type": "application/json"}


def test_api_reads_items_checks_edits_and_saves_decisions(api, folder):
    url, review = api
    status, headers, body = _call(url, "/")
    assert status == 200 and b'content="tok"' in body
    assert "default-src 'none'" in headers["content-security-policy"] and "frame-ancestors 'none'" in headers["content-security-policy"]
    status, _, body = _call(url, "/api/items", headers={"X-Kit-Token": "tok"})
    items = json.loads(body)["items"]
    assert status == 200 and [(i["id"], i["origin"]) for i in items] == [
        (f"{KITCHEN}-conversation", "kept"), (f"{KITCHEN}-detail", "kept"),
        (f"{STREET}-conversation", "rejected"), (f"{STREET}-detail", "rejected")]
    assert items[3]["bad"] == 3 and items[3]["kinds"] == ["count", "object"]

    status, _, body = _call(url, "/api/items/3", headers={"X-Kit-Token": "tok"})
    detail = json.loads(body)
    bad = [(c["text"], c["kind"], c["status"]) for c in detail["claims"] if c["status"] != "supported"]
    assert bad == [("people", "count", "contradicted"), ("bicycle", "object", "unsupported"), ("cat", "object", "unsupported")]
    assert detail["source"]["captions"] == ["Two people walk a dog past a parked car."] and detail["facts"]["counts"]["person"] == 2

    status, headers, body = _call(url, "/api/items/3/image", headers={"X-Kit-Token": "tok"})
    assert status == 200 and headers["content-type"] == "image/png"
    assert body == (folder.parent / "src" / "images" / "street.png").read_bytes()

    fixed = _edit_of(detail, "Two people walk a dog past a parked car; a cat sits on the car.")
    status, _, body = _call(url, "/api/items/3/check", {"conversations": fixed}, JSON_TOK)
    claims = json.loads(body)["claims"]
    assert status == 200 and [(c["concept"], c["status"]) for c in claims if c["status"] != "supported"] == [("cat", "unsupported")]

    status, _, body = _call(url, "/api/decisions", {"id": detail["id"], "decision": "edit", "conversations": fixed}, JSON_TOK)
    assert status == 200, body
    saved = json.loads(body)
    assert saved["item"]["decided"]["decision"] == "edit" and saved["item"]["decision"] == "edit"
    line = json.loads((folder / "review.jsonl").read_text().splitlines()[-1])
    assert line["id"] == detail["id"] and line["conversations"] == fixed and line["time"] and line["of"]

    status, _, body = _call(url, "/api/decisions", {"id": "nope", "decision": "accept"}, JSON_TOK)
    assert status == 400 and "no conversation with id 'nope'" in json.loads(body)["error"]["message"]
    status, _, body = _call(url, "/api/decisions", {"id": detail["id"], "decision": "edit", "conversations": fixed[:1]}, JSON_TOK)
    assert status == 400 and "has 1 turns" in json.loads(body)["error"]["message"]
    status, _, _ = _call(url, "/api/items/99", headers={"X-Kit-Token": "tok"})
    assert status == 404
    assert len((folder / "review.jsonl").read_text().splitlines()) == 1  # refused decisions leave no line


def test_api_refuses_what_a_cross_site_page_could_send(api, folder):
    url, _ = api
    decision = {"id": f"{KITCHEN}-detail", "decision": "accept"}
    for path in ("/api/items", "/api/items/0", "/api/items/0/image"):
        assert _call(url, path)[0] == 403  # no token: another site's page cannot read it
        assert _call(url, path, headers={"X-Kit-Token": "wrong"})[0] == 403
    assert _call(url, "/api/decisions", decision, {"Content-Type": "application/json"})[0] == 403
    # A form post (text/plain or urlencoded) even with the token: not JSON, refused.
    status, _, body = _call(url, "/api/decisions", json.dumps(decision).encode(), {"X-Kit-Token": "tok", "Content-Type": "text/plain"})
    assert status == 415
    status, _, _ = _call(url, "/api/decisions", b"id=x&decision=accept",
                         {"X-Kit-Token": "tok", "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    # DNS rebinding: a name other than this server's.
    status, _, body = _call(url, "/api/items", headers={"X-Kit-Token": "tok", "Host": "attacker.example"})
    assert status == 421 and json.loads(body)["error"]["code"] == "invalid_host"
    assert _call(url, "/api/decisions", b"{" * 100000, JSON_TOK)[0] == 400
    assert not (folder / "review.jsonl").exists()


def test_images_come_only_from_the_folders_own_conversations(folder):
    from kit.core.http import LOOPBACK_NAMES, running
    from kit.review.app import create_app
    from kit.review.folder import ReviewFolder

    (folder.parent / "secret.png").write_bytes((folder.parent / "src" / "images" / "street.png").read_bytes())
    data = json.loads((folder / "data.json").read_text())
    data[0]["image"] = "../secret.png"
    data[1]["image"] = "/etc/hostname"
    (folder / "data.json").write_text(json.dumps(data))
    with running(create_app(ReviewFolder(folder), hosts=set(LOOPBACK_NAMES), token="tok")) as url:
        for n in (0, 1):
            status, _, body = _call(url, f"/api/items/{n}/image", headers={"X-Kit-Token": "tok"})
            assert status == 404 and "escapes the image folder" in json.loads(body)["error"]["message"]
        assert _call(url, "/api/items/0/../../secret.png", headers={"X-Kit-Token": "tok"})[0] == 404
        assert _call(url, "/review.js/../../kit.json")[0] == 404


def test_with_a_key_every_api_call_needs_it(folder):
    from kit.core.http import LOOPBACK_NAMES, running
    from kit.review.app import create_app
    from kit.review.folder import ReviewFolder

    with running(create_app(ReviewFolder(folder), hosts=set(LOOPBACK_NAMES), api_key="k3y", token="tok")) as url:
        status, _, body = _call(url, "/")
        assert status == 200 and b'name="kit-keyed" content="1"' in body
        assert _call(url, "/api/items", headers={"X-Kit-Token": "tok"})[0] == 401
        assert _call(url, "/api/items", headers={"X-Kit-Token": "tok", "Authorization": "Bearer nope"})[0] == 401
        assert _call(url, "/api/items", headers={"Authorization": "Bearer k3y"})[0] == 403
        assert _call(url, "/api/items", headers={"X-Kit-Token": "tok", "Authorization": "Bearer k3y"})[0] == 200


def test_cli_refuses_a_reachable_address_without_a_key_and_bad_folders(folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "review", str(folder), "--host", "0.0.0.0", "--port", "0")
    assert code != 0 and err.count("\n") == 1 and "reachable from other machines" in err
    code, _, err = run_cli(capsys, "review", str(tmp_path / "src"), "--port", "0")
    assert code != 0 and err.count("\n") == 1 and "no data.json" in err
    code, _, err = run_cli(capsys, "review", str(tmp_path / "none"), "--port", "0")
    assert code != 0 and err.count("\n") == 1 and "is not a folder" in err


# ------------------------------------------------------------------ kill -9


def _start(folder: Path, log: Path) -> tuple[subprocess.Popen, str]:
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "kit", "review", str(folder), "--port", "0"], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"review page at (http://127\.0\.0\.1:\d+)/", log.read_text())
        if m:
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(m.group(1) + "/", timeout=5).read()
                    return proc, m.group(1)
                except OSError:
                    time.sleep(0.1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"kit review did not start:\n{log.read_text()}")


def _token(url: str) -> str:
    page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
    return re.search(r'name="kit-token" content="([^"]+)"', page).group(1)


def test_a_server_killed_with_sigkill_loses_no_acknowledged_decision(folder, tmp_path):
    proc, url = _start(folder, tmp_path / "a.log")
    try:
        headers = {"X-Kit-Token": _token(url), "Content-Type": "application/json"}
        sent = {f"{KITCHEN}-conversation": "accept", f"{KITCHEN}-detail": "reject", f"{STREET}-conversation": "accept"}
        for sid, decision in sent.items():
            status, _, _ = _call(url, "/api/decisions", {"id": sid, "decision": decision, "reason": "r" if decision == "reject" else ""},
                                 headers)
            assert status == 200
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc, url = _start(folder, tmp_path / "b.log")
    try:
        assert "3 decided" in (tmp_path / "b.log").read_text()
        status, _, body = _call(url, "/api/items", headers={"X-Kit-Token": _token(url)})
        got = {i["id"]: i["decision"] for i in json.loads(body)["items"] if i["decision"]}
        assert got == sent
    finally:
        proc.terminate()
        proc.wait(20)


# ------------------------------------------------------------------ training on a reviewed folder

TINY = as_flags(tiny(lora=True, quantization=None, train__batch_size=1, train__global_batch_size=1, data__max_length=512,
                     train__logging_steps=None, train__warmup_ratio=None))


def test_finetune_and_adapt_train_what_the_review_says(folder, tiny_base, tmp_path, capsys):
    from kit.core.recipes import load_recipe
    from kit.train.plan import plan_run
    from kit.train.run import plan_data

    data = json.loads((folder / "data.json").read_text())
    rescued = _rejects(folder)[f"{STREET}-detail"]
    fixed = _edit_of(rescued, "Two people walk a dog past a parked car on a grey afternoon.")
    log = ReviewLog(folder)
    log.append(Decision(data[0]["id"], "reject"))
    log.append(Decision(rescued["id"], "edit", conversations=fixed))

    recipe = load_recipe("llava15-lora", [s for s in TINY if s != "--set"])
    _, dataset, report = plan_data(plan_run(recipe, str(tiny_base), str(folder), str(tmp_path / "unused"), False))
    assert [it.id for it in dataset.items] == [rescued["id"]]  # data[1] is undecided: excluded
    tok = dataset.processing.processor.tokenizer
    enc = dataset.items[0]
    supervised = tok.decode([int(t) for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    assert "grey afternoon" in supervised and "bicycle" not in supervised
    assert report.review.edited == 1 and report.review.rejected == 1 and report.review.undecided == 1

    code, out_text, err = run_cli(capsys, "data", "check", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", str(folder),
                                  *TINY)
    assert code == 0, err
    assert "review: 0 accepted, 1 edited, 1 rejected, 1 undecided (excluded); 1 rescued" in out_text + err

    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", str(folder),
                           "--out", str(out), "--max-steps", "1", *TINY, "--set", "data.undecided=include")
    assert code == 0, err
    assert "data: 2/2 samples usable" in err and "0 accepted, 1 edited, 1 rejected, 1 undecided (included)" in err
    card = json.loads((out / "kit.json").read_text())
    assert card["review"]["edited"] == 1 and card["review"]["undecided"] == 1 and card["review"]["undecided_rule"] == "include"
    assert card["data"]["path"] == str(folder.resolve())

    out = tmp_path / "ad"
    code, _, err = run_cli(capsys, "adapt", "--recipe", "medical", "--base", str(tiny_base), "--data", str(folder), "--out", str(out),
                           "--max-steps", "1", "--set", "quantization=none", *TINY)
    assert code == 0, err
    card = json.loads((out / "kit.json").read_text())
    assert card["review"] == {**card["review"], "accepted": 0, "edited": 1, "rejected": 1, "undecided": 1, "rescued": 1}
    assert "data: 1/1 samples usable" in err

    log.path.write_text(json.dumps(Decision(data[0]["id"], "reject").to_json()) + "\n")
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", str(folder),
                           "--out", str(tmp_path / "none"), "--max-steps", "1", *TINY)
    assert code != 0 and err.count("\n") == 1 and "its review leaves nothing to train on" in err


def test_adapt_on_a_manifest_applies_the_review_of_its_generated_folder(tmp_path, tiny_base, capsys):
    import shutil

    src = draw_manifest(tmp_path / "src")
    with open(src / "manifest.jsonl", "a") as fh:  # more kitchens: one image is always held out
        for n in (2, 3):
            shutil.copy(src / "images" / "kitchen.png", src / "images" / f"kitchen{n}.png")
            fh.write(json.dumps({"image": f"images/kitchen{n}.png", "captions": [f"A bowl of fruit on kitchen table {n}."],
                                 "boxes": [{"label": "bowl", "bbox": [80, 80, 240, 160]}]}) + "\n")
    args = ["adapt", "--recipe", "medical", "--base", str(tiny_base), "--data", str(src), "--max-steps", "1",
            "--set", "quantization=none", "--set", "eval.held_out=0.25", "--set", "data.caption_pairs=false",
            "--set", "data.vqa_train=false", *TINY]
    with MockOpenAI(reply_for=_reply) as server:
        mock = ["--set", "generate.backend=openai", "--set", f"generate.base_url={server.base_url}", "--set", "generate.model=mock"]
        code, _, err = run_cli(capsys, *args, *mock, "--out", str(tmp_path / "a"))
        assert code == 0, err
        generated = src / ".kit" / "medical" / "generated"
        kept = json.loads((generated / "data.json").read_text())
        assert len(kept) >= 2 and "review:" not in err
        log = ReviewLog(generated)
        log.append(Decision(kept[0]["id"], "accept"))
        log.append(Decision(kept[1]["id"], "reject", reason="wrong"))
        code, _, err = run_cli(capsys, *args, *mock, "--out", str(tmp_path / "b"))
        assert code == 0, err
    undecided = len(kept) - 2
    assert f"review: 1 accepted, 0 edited, 1 rejected, {undecided} undecided (excluded)" in err
    train = json.loads((src / ".kit" / "medical" / "train.json").read_text())
    assert [s["id"] for s in train] == [kept[0]["id"]]
    card = json.loads((tmp_path / "b" / "kit.json").read_text())
    assert (card["review"]["accepted"], card["review"]["rejected"], card["review"]["undecided"]) == (1, 1, undecided)
