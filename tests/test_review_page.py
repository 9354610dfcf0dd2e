"""The `kit review` page driven by keyboard in headless Chromium against a real `kit review`:
accept, reject with a reason, rescue a rejected-by-check conversation by editing it, reload and
see the same state, then export and compare with the LLaVA JSON the decisions imply.

Same browser setup as test_web.py (Debian's Chromium through playwright; skipped, saying so,
without them). KIT_SCREENSHOT=path.png keeps a screenshot of the page at laptop width.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_review import KITCHEN, STREET, _start, generated_folder
from test_web import CHROMIUM, CHROMIUM_FLAGS, pytestmark  # noqa: F401 - the browser marks and skip apply here too

EDITED = "Two people walk a dog past a parked car on a quiet street."


@pytest.fixture
def page_and_server(tmp_path):
    from playwright.sync_api import sync_playwright

    folder = generated_folder(tmp_path)
    proc, url = _start(folder, tmp_path / "review.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            seen = {"requests": [], "console": []}
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.on("console", lambda m: seen["console"].append(m.text))
            page.on("pageerror", lambda e: seen["console"].append(f"page error: {e}"))
            try:
                yield page, url, folder, seen
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(20)


# Waits use selectors, not wait_for_function: the page's Content-Security-Policy forbids the eval
# that playwright's function predicates need, as it should.
def _showing(page, sid: str) -> None:
    page.wait_for_selector(f'main[data-loaded="{sid}"]', timeout=15000)


def _decided(page, decision: str) -> None:
    page.wait_for_selector(f'#decision-state[data-decision="{decision}"]', timeout=15000)


def _state(page) -> str:
    return page.get_attribute("#decision-state", "data-decision")


def test_review_page_by_keyboard_survives_a_reload_and_exports_exactly(page_and_server, tmp_path):
    page, url, folder, seen = page_and_server
    page.goto(url + "/")
    # The kept conversations come first; the first undecided one is open.
    _showing(page, f"{KITCHEN}-conversation")
    assert "0 / 2 decided" in page.text_content("#progress-text")
    assert page.is_visible("#keys") and "accept" in page.text_content("#keys")
    assert page.text_content("#source-body").count("person") == 0 and "bowl" in page.text_content("#source-body")
    page.wait_for_selector(f'#image[data-shows="{KITCHEN}-conversation"]')
    assert page.evaluate("() => document.getElementById('image').naturalWidth") == 320  # the drawn scene, fitted
    box = page.locator("#boxes").bounding_box()
    viewer = page.locator("#viewer").bounding_box()
    assert box["width"] > 0 and box["width"] <= viewer["width"] + 1 and abs(box["width"] / box["height"] - 320 / 240) < 0.02
    assert page.locator("#boxes .box").count() == 2

    page.keyboard.press("a")  # accept, and on to the next
    _showing(page, f"{KITCHEN}-detail")
    page.keyboard.press("r")
    page.wait_for_selector("#reason", state="visible")
    page.keyboard.type("too vague to teach anything")
    page.keyboard.press("Enter")
    _decided(page, "reject")
    assert "2 / 2 decided" in page.text_content("#progress-text")

    # The claim check's rejects, shown on request: the street's description invented a bicycle and a cat.
    page.check("#show-rejected")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    _showing(page, f"{STREET}-detail")
    assert page.text_content("#verdict") == "rejected by the claim check"
    marks = page.locator("#conversation mark.claim.unsupported, #conversation mark.claim.contradicted")
    # Each marked phrase carries the number of its entry in the claims list.
    assert marks.all_text_contents() == ["people1", "bicycle2", "cat3"]
    claims = page.text_content("#claims")
    assert "bicycle" in claims and "cat" in claims and "the source has 2, the answer says 3" in claims
    assert page.locator("#boxes .box").count() == 4

    page.keyboard.press("e")  # rescue it by removing what the source never said
    page.wait_for_selector("#conversation textarea:focus")
    page.keyboard.press("Control+a")
    page.keyboard.type(EDITED)
    page.click("#edit-check")
    page.wait_for_selector("#claims li.none")
    page.keyboard.press("Control+Enter")
    _decided(page, "edit")
    assert EDITED in page.text_content("#conversation")

    page.reload()
    _showing(page, f"{KITCHEN}-conversation")  # nothing undecided is left: the first item opens
    assert "2 / 2 decided · 1 accepted · 1 edited · 1 rejected · 1 rescued" in page.text_content("#progress-text")
    assert _state(page) == "accept"
    page.keyboard.press("ArrowRight")
    _showing(page, f"{KITCHEN}-detail")
    assert _state(page) == "reject" and "too vague" in page.text_content("#decision-state")
    page.check("#show-rejected")
    page.select_option("#filter-decision", "edit")
    _showing(page, f"{STREET}-detail")
    assert EDITED in page.text_content("#conversation") and page.is_visible("#original")
    page.select_option("#filter-decision", "all")
    page.select_option("#filter-kind", "absence")
    _showing(page, f"{STREET}-conversation")
    assert _state(page) in ("", None)

    shot = os.environ.get("KIT_SCREENSHOT")
    if shot:
        page.select_option("#filter-kind", "any")
        page.select_option("#filter-decision", "edit")
        page.wait_for_selector(f'#image[data-shows="{STREET}-detail"]')
        page.click("#original summary")
        page.screenshot(path=shot, full_page=True)

    # Nothing but this server was asked for anything; no script or style was refused.
    ours = (url + "/", "blob:" + url + "/")  # blob: URLs are the image bytes this server sent, shown from memory
    assert all(u.startswith(ours) for u in seen["requests"]), [u for u in seen["requests"] if not u.startswith(ours)]
    assert not [m for m in seen["console"] if "Content Security Policy" in m or "page error" in m], seen["console"]

    out = tmp_path / "export" / "train.json"
    proc = subprocess.run([sys.executable, "-m", "kit", "review", str(folder), "--export", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((folder / "data.json").read_text())
    rescued = {r["id"]: r for r in map(json.loads, (folder / "rejects.jsonl").read_text().splitlines())}[f"{STREET}-detail"]
    turns = [dict(t) for t in rescued["conversations"]]
    turns[1]["value"] = EDITED
    expected = [data[0], {"id": rescued["id"], "image": rescued["image"], "conversations": turns, "type": rescued["type"]}]
    assert json.loads(out.read_text()) == expected
    lines = [json.loads(line) for line in (folder / "review.jsonl").read_text().splitlines()]
    assert [(d["id"], d["decision"]) for d in lines] == [
        (f"{KITCHEN}-conversation", "accept"), (f"{KITCHEN}-detail", "reject"), (f"{STREET}-detail", "edit")]
    assert lines[1]["reason"] == "too vague to teach anything"
    assert Path(folder / "data.json").read_text() == json.dumps(data, indent=2) + "\n"  # as kit generate wrote it
