"""The web page `kit serve` shows at `/`, driven in headless Chromium against a real server.

Uses Debian's /usr/bin/chromium through the playwright client (never a browser playwright
downloads). Run with `bash setup.sh --browser && .venv/bin/python -m pytest -q -m browser`; set
KIT_SCREENSHOT=path.png to keep the screenshot. Skips, saying so, when Chromium or playwright is absent.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox: CI containers often lack user namespaces. The rest keeps Chromium off the network
# (no updates, sync or QUIC probes) and away from any GPU.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
API_KEY = "web-test-key"
ADAPTER = "shapes-lora"
MAX_TOKENS = 24  # short answers keep the CPU run quick; still several streamed pieces


def _missing() -> list[str]:
    missing = [] if CHROMIUM.is_file() else [f"Chromium ({CHROMIUM})"]
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package")
    return missing


# Decided at collection, so a machine without a browser skips before the tiny models are built.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(_missing()), reason=f"browser test skipped: {' and '.join(_missing())} absent; install with "
                       "`bash setup.sh --browser` (Debian's chromium package + the playwright client, which never downloads a browser)"),
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_base) -> Path:
    """A tiny LoRA adapter on the tiny base, as kit training would leave it (card naming its base)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kit.core import cards
    from kit.base.load import load_model
    from kit.train.model import lora_target_regex

    torch.manual_seed(1)
    model = load_model(tiny_base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_regex(model, "all-linear"),
                     modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM",
                     # Random B as well as A: a fresh LoRA is a no-op, and the adapter must answer
                     # differently from the base for picking it in the page to matter.
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    out = tmp_path_factory.mktemp("web-adapter") / ADAPTER
    peft_model.save_pretrained(out)
    cards.Card.new("adapter", made_by="tests/test_web.py", base=cards.describe_source(tiny_base)).write(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base, adapter):
    """`kit serve BASE shapes-lora=ADAPTER --api-key ...` as a user starts it, on a free loopback port."""
    log_path = tmp_path_factory.mktemp("web-server") / "serve.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "kit", "serve", str(tiny_base), f"{ADAPTER}={adapter}", "--port", "0", "--api-key", API_KEY]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def fail(why: str):
        raise AssertionError(f"{why}\n--- kit serve log ---\n{log_path.read_text()[-4000:]}")

    try:
        # Port 0 lets the server pick; it says which in its "serving ... at http://host:port/v1" line.
        url = None
        deadline = time.monotonic() + 240
        while url is None:
            if proc.poll() is not None:
                fail(f"kit serve exited with {proc.returncode} before serving")
            if time.monotonic() > deadline:
                fail("kit serve did not start serving within 240 s")
            m = re.search(r"serving .* at (http://127\.0\.0\.1:\d+)/v1", log_path.read_text())
            url = m.group(1) if m else None
            time.sleep(0.2)
        while True:  # the line comes just before uvicorn starts listening
            try:
                req = urllib.request.Request(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"})
                urllib.request.urlopen(req, timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    fail("kit serve did not answer /health")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A fresh profile per run: no cached page, no stored state from an earlier run.
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 900, "height": 900},
        )
        try:
            yield ctx
        finally:
            ctx.close()


def _post(url: str, body: dict, key: str = API_KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _non_streamed(url: str, body: dict) -> str:
    """What the server answers to the very request the page sent, asked without streaming."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    status, out = _post(url, plain)
    assert status == 200, out
    return out["choices"][0]["message"]["content"]


def _draw_png(path: Path) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((8, 20, 36, 48), fill=(200, 30, 30))
    img.save(path)
    return path.read_bytes()


# Records every distinct text the newest answer shows, so the test sees it grow piece by piece
# rather than trusting the page's own counter alone.
WATCH_ANSWER = """() => {
  window.__answerTexts = [];
  window.__askEnabledWhileStreaming = false;
  const seen = () => {
    const el = document.querySelector('#answer.streaming .text');
    const t = el ? el.textContent : null;
    const list = window.__answerTexts;
    if (t && list[list.length - 1] !== t) {
      list.push(t);
      if (!document.getElementById('ask').disabled) window.__askEnabledWhileStreaming = true;
    }
  };
  if (window.__watch) window.__watch.disconnect();
  window.__watch = new MutationObserver(seen);
  window.__watch.observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
}"""
FINISHED = "() => ['done', 'error'].includes(document.getElementById('status').dataset.state)"


def _ask(page, question: str, submit: str):
    """Type a question, submit it (click or Enter) and wait for the streamed answer to end; the request body."""
    page.evaluate(WATCH_ANSWER)
    page.fill("#question", question)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions") and r.method == "POST") as req:
        if submit == "click":
            page.click("#ask")
        else:
            page.press("#question", "Enter")
    page.wait_for_function(FINISHED, timeout=180_000)
    assert not page.evaluate("window.__askEnabledWhileStreaming"), "Ask was enabled while an answer streamed"
    return req.value.post_data_json


def test_web_page_streams_answers_from_an_adapter(server, browser_context, tiny_base, tmp_path):
    page = browser_context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))

    res = page.goto(server + "/")
    assert res.ok and res.headers["content-type"].startswith("text/html")

    # Without the key, the model list fails with the server's own 401 message in the page.
    status, wrong = _post(server, {"model": "x", "messages": [{"role": "user", "content": "hi"}]}, key="wrong")
    assert status == 401
    server_401 = wrong["error"]["message"]
    page.wait_for_function("() => !document.getElementById('error').hidden")
    assert server_401 in page.text_content("#error")

    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # the list reloads when the key field changes
    page.wait_for_function("() => document.querySelectorAll('#model option').length >= 2 && !document.getElementById('model').disabled")
    assert page.is_hidden("#error")
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == [ADAPTER, tiny_base.resolve().name]
    # `kit serve ADAPTER` serves the adapter: the menu starts on it, not on its base.
    assert page.eval_on_selector("#model", "s => s.value") == ADAPTER

    png = _draw_png(tmp_path / "circle.png")
    page.set_input_files("#image", str(tmp_path / "circle.png"))
    page.wait_for_selector("#preview", state="visible")
    page.fill("#max-tokens", str(MAX_TOKENS))

    t0 = time.monotonic()
    body = _ask(page, "What colour is the shape?", submit="click")
    first_s = time.monotonic() - t0
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#error")
    assert page.is_enabled("#ask")
    assert body["model"] == ADAPTER and body["stream"] is True and body["temperature"] == 0
    assert body["max_tokens"] == MAX_TOKENS
    # The small PNG goes as its own bytes, not re-encoded by a canvas.
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "text", "text": "What colour is the shape?"},
    ]}]
    answer = page.text_content("#answer .text")
    assert answer and answer == _non_streamed(server, body)
    assert answer != _non_streamed(server, {**body, "model": tiny_base.resolve().name}), "the adapter answers as the base"
    texts = page.evaluate("window.__answerTexts")
    assert len(texts) > 1, f"the answer arrived in one update, not streamed: {texts}"
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == answer
    assert int(page.get_attribute("#answer", "data-chunks")) > 1

    # A follow-up sends the earlier turns (the image once, in its own turn) and streams too.
    body2 = _ask(page, "Where is it?", submit="enter")
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#error")
    assert body2["messages"][:2] == body["messages"] + [{"role": "assistant", "content": answer}]
    assert body2["messages"][2] == {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]}
    answer2 = page.text_content("#answer .text")
    assert answer2 == _non_streamed(server, body2)
    assert page.locator("#conversation > li").count() == 4
    assert page.input_value("#question") == ""
    assert "Sent" in page.text_content("#image-note")

    shot = tmp_path / "kit-web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    if os.environ.get("KIT_SCREENSHOT"):
        dest = Path(os.environ["KIT_SCREENSHOT"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest)

    # A wrong key: the question is refused and the page shows the server's message, keeping the
    # question to retry and leaving the conversation as it was.
    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Tab")
    page.fill("#question", "And its size?")
    page.click("#ask")
    page.wait_for_function(FINISHED)
    assert page.get_attribute("#status", "data-state") == "error"
    assert server_401 in page.text_content("#error")
    assert page.input_value("#question") == "And its size?"
    assert page.locator("#conversation > li").count() == 4
    assert page.is_enabled("#ask")

    # Stop ends a long answer early; what arrived stays as the answer.
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")
    page.fill("#max-tokens", "1000")
    page.evaluate(WATCH_ANSWER)
    page.fill("#question", "Describe it at length.")
    page.click("#ask")
    page.wait_for_function("() => +(document.querySelector('#answer.streaming') || {dataset: {}}).dataset.chunks >= 2")
    page.click("#stop")
    page.wait_for_function(FINISHED)
    assert page.get_attribute("#status", "data-state") == "done" and "stopped" in page.text_content("#status")
    assert page.text_content("#answer .text") and page.is_enabled("#ask") and page.is_hidden("#stop")
    assert page.locator("#conversation > li").count() == 6

    page.click("#clear")
    assert page.locator("#conversation > li").count() == 0
    assert "next question" in page.text_content("#image-note")  # a new conversation sends the image again

    # A big picture is shrunk in a canvas before it is sent.
    from PIL import Image

    Image.new("RGB", (3000, 1500), (20, 120, 200)).save(tmp_path / "big.png")
    page.set_input_files("#image", str(tmp_path / "big.png"))
    page.wait_for_function("() => document.getElementById('image-note').textContent.includes('sent as')")
    assert "3000×1500, sent as 1536×768" in page.text_content("#image-note")

    # Self-contained: nothing but the kit server was asked for anything.
    assert requests and all(u.startswith(server + "/") for u in requests), requests
    assert not console_errors, console_errors
    print(f"\nweb test: first answer {first_s:.1f} s ({len(texts)} updates): {answer!r}; screenshot {shot}")
