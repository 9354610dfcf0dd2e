"""`kit serve`: the real server (uvicorn on a loopback port) driven by the official `openai` client.

One tiny base and two tiny LoRA adapters on it (random, non-identity LoRA weights and projector,
so each answers differently) are served from one model in memory. Every answer is checked against
the same model loaded on its own by kit.infer.load and generated with plain `model.generate`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import make_adapter
from tests.test_serve_batching import wait_until

SERVE_TARGETS = ["q_proj", "v_proj", "down_proj"]

KEY = "test-key-123"
PROMPT = "What is in the picture?"


_DIRECT: dict = {}


def direct_answer(path: Path, messages: list[dict], images: list, max_new_tokens: int) -> str:
    """Greedy answer of the model at `path` loaded on its own (kit.infer.load), with plain generate + decode."""
    import torch

    from kit.infer.generation import pad_id, stop_ids, to_model
    from kit.infer.prompts import prepare
    from kit.infer.load import load_for_inference

    if str(path) not in _DIRECT:
        _DIRECT[str(path)] = load_for_inference(path)
    loaded = _DIRECT[str(path)]
    model, proc = loaded.model, loaded.processor
    inputs = to_model(prepare(proc, loaded.spec, messages, images), model)
    stops = stop_ids(model, proc.tokenizer)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad_id(proc.tokenizer, stops))
    return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    # 'beta' lives in a folder with another name: served as beta=PATH.
    return {"alpha": make_adapter(tiny_base, root / "alpha", seed=1, template="vicuna_v1", targets=SERVE_TARGETS),
            "beta": make_adapter(tiny_base, root / "lora-b", seed=2, targets=SERVE_TARGETS)}


@pytest.fixture(scope="module")
def image_root(shapes, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image-root")
    shutil.copy(Path(shapes["root"]) / "images" / "shape_00000.png", root / "shape.png")
    return root


@pytest.fixture(scope="module")
def pool(tiny_base, adapters):
    from kit.serve.pool import load_pool

    return load_pool(tiny_base, [str(adapters["alpha"]), f"beta={adapters['beta']}"], echo=lambda m: None)


@pytest.fixture(scope="module")
def url(pool, image_root):
    from kit.serve.app import create_app
    from kit.core.http import running

    app = create_app(pool, api_key=KEY, image_root=image_root, max_request_bytes=100_000, max_tokens_limit=64, max_images=2)
    with running(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def paths(tiny_base, adapters) -> dict[str, Path]:
    return {tiny_base.resolve().name: tiny_base, "alpha": adapters["alpha"], "beta": adapters["beta"]}


def _ask(client, model, content, **kw):
    kw.setdefault("temperature", 0)
    if "max_completion_tokens" not in kw:
        kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def _raw(url: str, body: bytes | None, headers: dict | None = None, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------------------------- answers


def test_models_lists_both_adapters_then_the_base(client, paths):
    listed = {m.id: m for m in client.models.list().data}
    base, alpha, beta = paths
    assert list(listed) == [alpha, beta, base]  # adapters first, as a menu should offer them
    assert [listed[n].model_extra["kind"] for n in listed] == ["adapter", "adapter", "base"]
    assert client.models.retrieve("beta").id == "beta"


def test_each_name_answers_as_that_model_loaded_alone(client, paths, image_root):
    """The base (adapters disabled) and each adapter, switched per request on one model in memory,
    answer exactly as each folder loaded on its own does: text-only and with an image."""
    from kit.infer.images import load_image_file

    image = load_image_file(image_root / "shape.png")
    answers = {}
    for name, path in paths.items():
        r = _ask(client, name, PROMPT)
        assert r.choices[0].message.content == direct_answer(path, [{"role": "user", "content": PROMPT}], [], 8), name
        assert r.model == name and r.object == "chat.completion"
        assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        content = [{"type": "image_url", "image_url": {"url": png_data_url(image_root / "shape.png")}}, {"type": "text", "text": PROMPT}]
        r_img = _ask(client, name, content)
        want = direct_answer(path, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], [image], 8)
        assert r_img.choices[0].message.content == want, name
        # The image tokens are counted: the tiny tower adds 16 per image.
        assert r_img.usage.prompt_tokens >= r.usage.prompt_tokens + 16
        answers[name] = r_img.choices[0].message.content
    assert len(set(answers.values())) == 3, f"base and adapters should answer differently: {answers}"


def test_image_by_path_under_the_image_root_equals_the_inline_image(client, image_root):
    inline = _ask(client, "alpha", [{"type": "image_url", "image_url": {"url": png_data_url(image_root / "shape.png")}},
                                    {"type": "text", "text": PROMPT}])
    for ref in ("shape.png", str(image_root / "shape.png"), (image_root / "shape.png").as_uri()):
        by_path = _ask(client, "alpha", [{"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": PROMPT}])
        assert by_path.choices[0].message.content == inline.choices[0].message.content, ref


def test_streaming_deltas_join_to_the_non_streaming_answer(client, image_root):
    content = [{"type": "image_url", "image_url": {"url": png_data_url(image_root / "shape.png")}}, {"type": "text", "text": PROMPT}]
    for temperature in (0, 1.0):  # greedy, and sampled with a fixed seed
        whole = _ask(client, "beta", content, temperature=temperature, seed=7, max_tokens=12)
        chunks = list(_ask(client, "beta", content, temperature=temperature, seed=7, max_tokens=12,
                           stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    again = _ask(client, "beta", content, temperature=1.0, seed=7, max_tokens=12)
    assert again.choices[0].message.content == whole.choices[0].message.content  # the seed fixes sampling


def test_stop_string_cuts_the_answer(client, paths):
    base = next(iter(paths))
    full = _ask(client, base, PROMPT, max_tokens=16).choices[0].message.content
    assert len(full) >= 4, f"the base should say something: {full!r}"
    stop = full[2:4]
    cut = full[: full.index(stop)].rstrip()
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in _ask(client, base, PROMPT, max_tokens=16, stop=[stop], stream=True) if c.choices)
        else:
            r = _ask(client, base, PROMPT, max_tokens=16, stop=stop)
            got = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
        assert got == cut


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client, paths):
    base = next(iter(paths))
    full = _ask(client, base, PROMPT, max_tokens=16)
    n = full.usage.completion_tokens
    assert n >= 2, f"the base should say a few tokens: {full.choices[0].message.content!r}"
    cut = _ask(client, base, PROMPT, max_completion_tokens=n - 1)
    assert cut.usage.completion_tokens == n - 1 and cut.choices[0].finish_reason == "length"
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)


# ---------------------------------------------------------------------------------------- errors


def test_bad_requests_get_openai_errors(client, url, image_root, paths, tmp_path):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        _ask(client, "gamma", PROMPT)
    assert "gamma" in str(e.value) and all(n in str(e.value) for n in paths)
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "invalid_request_error"

    def image(url_):
        return [{"type": "image_url", "image_url": {"url": url_}}, {"type": "text", "text": PROMPT}]

    outside = tmp_path / "outside.png"
    shutil.copy(image_root / "shape.png", outside)
    not_png = "data:image/png;base64," + base64.b64encode(b"this is not a picture").decode()
    cases = {
        "not valid base64": image("data:image/png;base64,@@@not-base64@@@"),
        "not an image kit reads": image(not_png),
        "does not fetch https": image("https://example.com/cat.png"),
        "escapes the image folder": image(str(outside)),
        "escapes the image folder ": image(outside.as_uri()),
        "too many images": image(png_data_url(image_root / "shape.png")) * 3,
    }
    for message, content in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, "alpha", content)
        assert message.strip() in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError, match="above this server's limit of 64"):
        _ask(client, "alpha", PROMPT, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="'messages'"):
        client.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.BadRequestError, match="reads at most 512"):  # the tiny LLM's context
        _ask(client, "alpha", "word " * 600)
    with pytest.raises(openai.APIStatusError) as e:
        _ask(client, "alpha", "x" * 150_000)
    assert e.value.status_code == 413 and "100,000 bytes" in e.value.message

    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = _raw(url, b'{"model": "alpha", "messages": [', auth)
    assert status == 400 and "not valid JSON" in body["error"]["message"] and set(body["error"]) >= {"message", "type", "code"}
    status, body = _raw(url, json.dumps({"model": "alpha"}).encode(), auth)
    assert status == 400 and "'messages'" in body["error"]["message"]
    status, body = _raw(url, b"x" * 200_000, {**auth, "Content-Length": "200000"})
    assert status == 413


def test_api_key_guards_every_v1_route(url, client):
    import openai

    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            _ask(bad, "alpha", PROMPT)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    status, body = _raw(url, json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _ask(client, "alpha", PROMPT).choices[0].message.content is not None
    status, body = _raw(url, None, path="/health")  # a set key guards /health too: it lists the models
    assert status == 401
    status, body = _raw(url, None, {"Authorization": f"Bearer {KEY}"}, path="/health")
    assert status == 200 and body["status"] == "ok"


def test_web_page_hook(pool, tmp_path, url):
    from kit.serve.app import create_app
    from kit.core.http import running

    with urllib.request.urlopen(url + "/", timeout=10) as r:
        assert "no web page is installed" in r.read().decode() or r.headers["content-type"].startswith("text/html")
    (tmp_path / "index.html").write_text("<!doctype html><title>kit chat</title>")
    (tmp_path / "app.js").write_text("console.log('kit')")
    with running(create_app(pool, web_dir=tmp_path)) as other:
        with urllib.request.urlopen(other + "/", timeout=10) as r:
            assert r.headers["content-type"].startswith("text/html") and "<title>kit chat</title>" in r.read().decode()
        with urllib.request.urlopen(other + "/web/app.js", timeout=10) as r:
            assert "console.log" in r.read().decode()


def test_burst_of_concurrent_requests_is_answered_correctly(url, client, paths):
    """32 requests at once over three names: the generation lock keeps each answer from its own
    model (adapter selection is model-wide state) and the server answers afterwards."""
    from openai import AsyncOpenAI

    names = list(paths)
    want = {n: _ask(client, n, PROMPT, max_tokens=4).choices[0].message.content for n in names}

    async def burst():
        aclient = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            tasks = [aclient.chat.completions.create(model=names[i % 3], messages=[{"role": "user", "content": PROMPT}],
                                                     max_tokens=4, temperature=0) for i in range(32)]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        finally:
            await aclient.close()

    t0 = time.monotonic()
    results = asyncio.run(burst())
    assert len(results) == 32
    for i, r in enumerate(results):
        assert r.choices[0].message.content == want[names[i % 3]], i
    assert time.monotonic() - t0 < 120
    assert _ask(client, names[0], PROMPT, max_tokens=4).choices[0].message.content == want[names[0]]


def test_requests_arriving_together_are_batched_and_greedy_answers_do_not_change(url, pool, paths, image_root):
    """8 requests at once for one adapter, with and without an image, of different lengths,
    budgets and stop strings, one streamed: they are generated in batches (left-padded), and each
    greedy answer is exactly what the adapter loaded alone answers, cut by its own max_tokens and
    stop string; a request for another name in the same burst answers as that model."""
    from openai import AsyncOpenAI

    from kit.infer.images import load_image_file

    image = load_image_file(image_root / "shape.png")
    picture = {"type": "image_url", "image_url": {"url": png_data_url(image_root / "shape.png")}}
    questions = ["What is in the picture?", "Describe it.", "Where is the shape in this image, and what colour is it?", "Hi"]
    asks = []
    for i in range(8):
        q = questions[i % 4]
        with_image = i % 2 == 0
        asks.append({"model": "alpha", "q": q, "image": with_image, "max_tokens": 4 + i, "stream": i == 5,
                     "content": [picture, {"type": "text", "text": q}] if with_image else q})
    asks.append({"model": "beta", "q": questions[0], "image": True, "max_tokens": 6, "stream": False,
                 "content": [picture, {"type": "text", "text": questions[0]}]})
    before = pool.batcher.batches

    async def burst():
        aclient = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(a):
            kw = dict(model=a["model"], messages=[{"role": "user", "content": a["content"]}], max_tokens=a["max_tokens"], temperature=0)
            if a["stream"]:
                text = ""
                async for c in await aclient.chat.completions.create(stream=True, **kw):
                    text += (c.choices[0].delta.content or "") if c.choices else ""
                return text, None
            r = await aclient.chat.completions.create(**kw)
            return r.choices[0].message.content, r

        try:
            return await asyncio.wait_for(asyncio.gather(*[one(a) for a in asks]), timeout=120)
        finally:
            await aclient.close()

    results = asyncio.run(burst())
    assert pool.batcher.largest >= 4, "requests that arrived together were not generated together"
    assert pool.batcher.batches - before < len(asks)
    for a, (text, r) in zip(asks, results):
        messages = [{"role": "user", "content": ([{"type": "image"}, {"type": "text", "text": a["q"]}] if a["image"] else a["q"])}]
        want = direct_answer(paths[a["model"]], messages, [image] if a["image"] else [], a["max_tokens"])
        assert text == want, a
        if r is not None:
            assert r.usage.completion_tokens <= a["max_tokens"]
            if r.usage.completion_tokens == a["max_tokens"]:
                assert r.choices[0].finish_reason == "length"


def test_sampled_requests_in_one_batch_keep_their_own_temperature(pool):
    """Sampled rows share a batch; a row at a tiny temperature answers like greedy, whatever its
    neighbours ask for."""
    from kit.infer.generation import Sampling

    name = "alpha"
    inputs = pool.prepare(name, [{"role": "user", "content": PROMPT}], [])
    greedy = pool.start(name, inputs, Sampling(8, 0.0)).result()
    rows = [pool.start(name, inputs, Sampling(8, t)) for t in (1e-4, 5.0, 1e-4, 5.0)]
    texts = [r.result() for r in rows]
    assert texts[0] == texts[2] == greedy
    assert texts[1] != greedy or texts[3] != greedy  # at temperature 5 the tiny model's answer wanders


def _slow_tokens(pool, monkeypatch, seconds: float = 0.02):
    """Each picked token takes `seconds` longer: the tiny model otherwise answers before a test can act."""
    picker = pool.batcher.picker

    def slow(row, logits):
        time.sleep(seconds)
        return picker(row, logits)

    monkeypatch.setattr(pool.batcher, "picker", slow)


def test_a_cancelled_row_leaves_the_batch_at_the_next_step(pool, monkeypatch):
    """Two rows decode together; one is cancelled mid-answer: it stops at once (finish 'stop', far
    from its budget), the batch shrinks to one row at the next step, and the other answers exactly
    as it would alone."""
    from kit.infer.generation import Sampling

    _slow_tokens(pool, monkeypatch)
    name = "alpha"
    other = pool.prepare(name, [{"role": "user", "content": "Hi"}], [])
    alone = pool.start(name, other, Sampling(12)).result()
    batcher = pool.batcher
    with batcher.cond:
        doomed = pool.start(name, pool.prepare(name, [{"role": "user", "content": PROMPT}], []), Sampling(60))
        kept = pool.start(name, other, Sampling(12))
    wait_until(lambda: doomed.completion_tokens >= 3, "the rows did not start")
    steps = len(batcher.sizes)
    doomed.cancel()
    assert kept.result() == alone
    assert doomed._done.wait(10) and doomed.finish_reason == "stop" and doomed.completion_tokens < 20
    after = list(batcher.sizes)[steps:]
    assert after[:1] in ([2], [1]) and set(after[1:]) == {1}, after  # gone by the step after the cancel


def test_a_client_that_disconnects_mid_stream_frees_its_row(url, pool, monkeypatch):
    """A streamed request whose client closes the connection after two pieces stops generating
    (its row leaves the batch long before its 64-token budget) while another request goes on."""
    import http.client

    from kit.infer.generation import Sampling

    _slow_tokens(pool, monkeypatch)
    name = "alpha"
    neighbour = pool.start(name, pool.prepare(name, [{"role": "user", "content": "Hi"}], []), Sampling(40))
    started = []
    real_start = pool.start
    monkeypatch.setattr(pool, "start", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1])
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": name, "stream": True, "max_tokens": 64, "temperature": 0,
                       "messages": [{"role": "user", "content": PROMPT}]})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    reply = conn.getresponse()
    assert reply.status == 200
    seen = 0
    while seen < 3:  # the role chunk, then two pieces of content
        line = reply.fp.readline()
        seen += line.startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    wait_until(lambda: started and started[0]._done.is_set(), "the disconnected request kept generating", timeout=30)
    assert started[0].completion_tokens < 40, started[0].completion_tokens
    assert neighbour.live or neighbour.completion_tokens > started[0].completion_tokens
    neighbour.result()


# ---------------------------------------------------------------------------------- loading / CLI


def test_adapters_on_another_base_or_with_clashing_names_are_refused(tiny_base, adapters, tmp_path):
    from kit.core.errors import KitError
    from kit.serve.pool import load_pool

    other = tmp_path / "other"
    shutil.copytree(adapters["alpha"], other)
    card = json.loads((other / "kit.json").read_text())
    # The adapter's own base check passes (the path and fingerprint match that base) ...
    fake_base = tmp_path / "fake-base"
    shutil.copytree(tiny_base, fake_base)
    cfg = json.loads((fake_base / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-3
    (fake_base / "config.json").write_text(json.dumps(cfg))
    from kit.core import cards

    card["base"] = cards.describe_source(fake_base)
    (other / "kit.json").write_text(json.dumps(card))
    # ... but it is not the served base.
    with pytest.raises(KitError, match="not on the served base"):
        load_pool(tiny_base, [str(adapters["alpha"]), str(other)], echo=lambda m: None)
    with pytest.raises(KitError, match="two served models are named 'alpha'"):
        load_pool(tiny_base, [str(adapters["alpha"]), f"alpha={adapters['beta']}"], echo=lambda m: None)
    with pytest.raises(KitError, match="is a full model, not an adapter"):
        load_pool(tiny_base, [str(tiny_base)], echo=lambda m: None)


def test_a_base_alone_is_served_with_its_own_prompt_format(tiny_base):
    from kit.infer.generation import Sampling
    from kit.serve.pool import load_pool

    pool = load_pool(tiny_base, echo=lambda m: None)
    assert pool.names == [tiny_base.resolve().name] and pool.get(pool.names[0]).kind == "base"
    messages = [{"role": "user", "content": PROMPT}]
    gen = pool.start(pool.names[0], pool.prepare(pool.names[0], messages, []), Sampling(max_new_tokens=6))
    assert gen.result() == direct_answer(tiny_base, messages, [], 6)


def test_non_loopback_host_needs_a_key_and_warns_before_loading(tiny_base, monkeypatch, tmp_path):
    import socket

    import kit.serve.pool
    import kit.serve.run
    from kit.core.network import resolves_only_to_loopback
    from kit.core.errors import KitError

    lines = []
    # Tests only ever listen on loopback: the socket the warning is about is not really bound.
    monkeypatch.setattr(kit.serve.run, "bind", lambda host, port: socket.create_server(("127.0.0.1", 0)))
    assert resolves_only_to_loopback("localhost") and resolves_only_to_loopback("::1") and not resolves_only_to_loopback("0.0.0.0")

    def stop(*a, **k):
        raise KitError("stopped before loading")

    monkeypatch.setattr(kit.serve.run, "load_pool", stop)
    with pytest.raises(KitError, match="reachable from other machines: set a key with KIT_API_KEY or --api-key-file"):
        kit.serve.run.serve(tiny_base, host="0.0.0.0", port=0, echo=lines.append)
    assert lines == []
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    with pytest.raises(KitError, match="stopped before loading"):
        kit.serve.run.serve(tiny_base, host="0.0.0.0", port=0, echo=lines.append, api_key_file=key_file)
    assert any(l.startswith("warning: listening on 0.0.0.0") and "with the key" in l for l in lines), lines
    key_file.write_text("\n")
    with pytest.raises(KitError, match="first line is empty"):
        kit.serve.run.serve(tiny_base, host="0.0.0.0", port=0, echo=lines.append, api_key_file=key_file)


def test_kit_serve_command_serves_until_interrupted(tiny_base, adapters):
    """The CLI runner end to end: a taken port fails fast; then a real `kit serve` answers and stops on Ctrl-C."""
    import socket

    kit_bin = str(Path(sys.executable).with_name("kit"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        r = subprocess.run([kit_bin, "serve", str(tiny_base), "--port", str(taken.getsockname()[1])],
                           check=False, capture_output=True, text=True, env=env, timeout=120)
    finally:
        taken.close()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "choose another --port" in r.stderr, r.stderr

    proc = subprocess.Popen([kit_bin, "serve", str(adapters["alpha"]), "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not any("serving" in l for l in lines):
            line = proc.stderr.readline()
            assert line, "kit serve exited early: " + "".join(lines)
            lines.append(line)
        served = next(l for l in lines if "serving" in l)
        assert f"serving alpha, {tiny_base.resolve().name} at http://127.0.0.1:" in served  # the adapter first
        port = int(served.split("127.0.0.1:")[1].split("/")[0])
        from openai import OpenAI

        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["alpha", tiny_base.resolve().name]  # adapters first
        assert isinstance(_ask(c, "alpha", PROMPT, max_tokens=2).choices[0].message.content, str)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), proc.returncode


def test_requests_past_the_queue_limit_get_429_and_the_server_recovers(pool):
    """With the model held busy, two requests are admitted and wait; the third is refused with 429
    and Retry-After (the OpenAI client's cue to back off) instead of queueing without bound."""
    import concurrent.futures

    import openai

    from kit.serve.app import create_app
    from kit.core.http import running

    app = create_app(pool, max_tokens_limit=8, max_queue=2)
    ask = {"model": "alpha", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": PROMPT}]}
    with running(app) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            with pool.lock:  # what a long generation would do: nobody else gets the model
                waiting = [ex.submit(client.chat.completions.create, **ask) for _ in range(2)]
                deadline = time.monotonic() + 30
                while app.state.admission.count < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert app.state.admission.count == 2
                with pytest.raises(openai.RateLimitError) as refused:
                    client.chat.completions.create(**ask)
                assert refused.value.response.headers.get("retry-after") == "1"
                assert "limit 2" in refused.value.message
            answers = [f.result(timeout=60).choices[0].message.content for f in waiting]
        assert answers[0] == answers[1]
        assert app.state.admission.count == 0
        assert client.chat.completions.create(**ask).choices[0].message.content == answers[0]


SERVE_OFFLINE = r"""
import json, signal, subprocess, sys, urllib.request
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # loopback only: nothing else exists here
kit, model, question = sys.argv[1:4]
proc = subprocess.Popen([kit, "serve", model, "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    while "serving" not in (line := proc.stderr.readline()):
        assert line, "kit serve exited early"
    url = line.split(" at ")[1].split()[0]
    body = {"model": "alpha", "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": question}]}
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    print(json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["message"]["content"])
finally:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
"""


def test_kit_serve_answers_with_no_network_at_all(tiny_base, adapters):
    """`unshare -n` leaves the server process a loopback interface and nothing else, with
    HF_HUB_OFFLINE unset: loading and answering must not need the network."""
    if shutil.which("unshare") is None or shutil.which("ip") is None or subprocess.run(
            ["unshare", "-n", "true"], check=False, capture_output=True).returncode != 0:
        pytest.skip("unshare -n / ip are not available here (need root or user namespaces, and iproute2)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["OMP_NUM_THREADS"] = "1"
    kit_bin = str(Path(sys.executable).with_name("kit"))
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", SERVE_OFFLINE, kit_bin, str(adapters["alpha"]), PROMPT],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    want = direct_answer(adapters["alpha"], [{"role": "user", "content": PROMPT}], [], 4)
    assert r.stdout == want + "\n"


# ------------------------------------------------------------------------------------- hardening

AUTH = {"Authorization": f"Bearer {KEY}"}
HI = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


@pytest.mark.parametrize("host,status", [
    ("evil.example", 421), ("127.0.0.1.evil.example", 421), ("attacker.localhost", 421),
    ("localhost", 200), ("127.0.0.1", 200), ("LOCALHOST", 200),
])
def test_requests_must_name_this_server_in_host(url, host, status):
    """DNS rebinding: a page on another site that points its name at 127.0.0.1 still sends its own name."""
    port = url.rsplit(":", 1)[1]
    got, body = _raw(url, HI, {**AUTH, "Host": f"{host}:{port}"})
    assert got == status, body
    if status == 421:
        assert body["error"]["code"] == "invalid_host"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""])
def test_only_json_bodies_are_read(url, content_type):
    """A cross-site form or text/plain POST (sent by browsers without asking) is refused before parsing."""
    status, body = _raw(url, HI, {**AUTH, "Content-Type": content_type})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    status, _ = _raw(url, HI, {**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_responses_carry_no_paths_or_exception_text(url, pool, image_root, monkeypatch):
    status, body = _raw(url, None, AUTH, path="/v1/models")
    assert status == 200 and all("path" not in m for m in body["data"])
    assert str(Path.cwd()) not in json.dumps(body) and "/tmp" not in json.dumps(body)
    missing = {"model": "alpha", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "no/such/scan.png"}}, {"type": "text", "text": "?"}]}]}
    status, body = _raw(url, json.dumps(missing).encode(), AUTH)
    assert status == 400 and "no/such/scan.png" in body["error"]["message"]
    assert str(image_root) not in body["error"]["message"] and str(image_root.resolve()) not in body["error"]["message"]

    def broken(*a, **k):
        raise RuntimeError("cuda error at /home/alice/patients/jane-roe")

    monkeypatch.setattr(pool, "start", broken)
    status, body = _raw(url, HI, AUTH)
    assert status == 500 and "jane-roe" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)


def test_a_full_queue_answers_429_before_parsing_then_recovers(pool, monkeypatch):
    """Admission comes first: past --max-queue even a malformed body gets 429, at once; when the
    running request finishes, the next is served. More admitted requests than worker threads never hang."""
    import threading

    from kit.serve.app import create_app
    from kit.core.http import running

    gate = threading.Event()
    real = pool.prepare

    def slow_prepare(*a, **k):
        gate.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(pool, "prepare", slow_prepare)
    app = create_app(pool, max_queue=2)
    with running(app) as url:
        results = []
        threads = [threading.Thread(target=lambda: results.append(_raw(url, HI)[0])) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while app.state.admission.count < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        status, body = _raw(url, b"{not json")
        assert status == 429 and body["error"]["code"] == "server_busy" and time.monotonic() - t0 < 5
        gate.set()
        for t in threads:
            t.join(60)
        assert results == [200, 200]
        assert _raw(url, HI)[0] == 200



def test_extreme_images_and_numbers_are_400s_not_500s(url, tmp_path):
    """A small file with an extreme shape (a huge canvas once padded square), a decompression bomb,
    and a seed beyond what samplers take: each a 400 that says what is wrong."""
    import struct
    import zlib

    def png(w, h):
        raw = zlib.compress(b"".join(b"\x00" + b"\x00" * ((w + 7) // 8) for _ in range(h)), 9)

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")

    for w, h, said in ((40000, 1000, "40000x1000 pixels"), (16000, 16000, "far larger than kit takes")):
        data = base64.b64encode(png(w, h)).decode()
        body = {"model": "alpha", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}, {"type": "text", "text": "?"}]}]}
        status, reply = _raw(url, json.dumps(body).encode(), AUTH)
        assert status == 400 and said in reply["error"]["message"], reply
    status, reply = _raw(url, json.dumps({**json.loads(HI), "seed": 2**70}).encode(), AUTH)
    assert status == 400 and "seed" in reply["error"]["message"], reply
    # Python's JSON reader refuses these itself (recursion and digit limits): a 400 naming why.
    deep = b'{"model": "alpha", "messages": ' + b"[" * 40_000 + b"]" * 40_000 + b"}"
    status, reply = _raw(url, deep, AUTH)
    assert status == 400 and "nested too deeply" in reply["error"]["message"], reply
    status, reply = _raw(url, HI.replace(b'"max_tokens": 2', b'"max_tokens": ' + b"9" * 5000), AUTH)
    assert status == 400 and "too many digits" in reply["error"]["message"], reply
    status, reply = _raw(url, HI.replace(b'"max_tokens": 2', b'"temperature": NaN'), AUTH)
    assert status == 400 and "NaN is not a JSON number" in reply["error"]["message"], reply


def _rgb_png(w: int, h: int) -> bytes:
    """A flat RGB PNG: a few kilobytes that decode to w * h * 3 bytes."""
    import struct
    import zlib

    raw = zlib.compress(b"".join(b"\x00" + b"\x80" * (3 * w) for _ in range(h)), 9)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_waiting_requests_hold_no_decoded_images(pool, monkeypatch):
    """Three requests with an 8192 x 4882 PNG (under 10 KB, ~120 MiB decoded, inside the pixel
    limit) wait while the model is busy: their images are decoded one at a time (the budget here is
    one 8192 px canvas) and none of the decoded images is alive while they wait; all are answered."""
    import concurrent.futures
    import gc

    from PIL import Image

    from kit.serve.app import create_app
    from kit.core.http import running

    png = _rgb_png(8192, 4882)
    assert len(png) < 200_000
    prepared = []
    real = pool.prepare
    monkeypatch.setattr(pool, "prepare", lambda *a, **k: (real(*a, **k), prepared.append(1))[0])
    app = create_app(pool, max_queue=4, max_decoded_pixels=8192**2)
    body = json.dumps({"model": "alpha", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "text", "text": "?"}]}]}).encode()
    with running(app) as base_url, concurrent.futures.ThreadPoolExecutor(3) as ex:
        with pool.lock:  # a long generation: every request waits for the model
            waiting = [ex.submit(_raw, base_url, body) for _ in range(3)]
            deadline = time.monotonic() + 120
            while len(prepared) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            assert len(prepared) == 3 and app.state.admission.count == 3
            gc.collect()
            big = [o for o in gc.get_objects() if isinstance(o, Image.Image) and max(o.size) >= 4882]
            assert big == [], [o.size for o in big]
            assert app.state.pixels.used == 0 and app.state.pixels.peak == 8192**2
        assert [f.result(timeout=120)[0] for f in waiting] == [200, 200, 200]


def _whole_reply(sock) -> str:
    """One HTTP reply read off a raw socket: headers, then Content-Length bytes of body (a single
    recv may return the headers alone)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode("latin-1")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_body_that_never_arrives_frees_its_place(pool):
    """Two clients send headers and then nothing: they hold the queue (max 2) only until the body
    timeout, get 408, and the next request is served."""
    import socket

    from kit.serve.app import create_app
    from kit.core.http import running

    app = create_app(pool, max_queue=2, body_timeout_s=1.5)
    with running(app) as base_url:
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        stalled = []
        for _ in range(2):
            s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      "Content-Length: 500\r\n\r\n".encode())
            stalled.append(s)
        deadline = time.monotonic() + 10
        while app.state.admission.count < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.admission.count == 2
        assert _raw(base_url, HI)[0] == 429
        replies = [_whole_reply(s) for s in stalled]
        for s in stalled:
            s.close()
        assert all(r.startswith("HTTP/1.1 408") and "request_timeout" in r for r in replies), replies
        assert app.state.admission.count == 0
        assert _raw(base_url, HI)[0] == 200
