"""`kit chat` as users run it (the CLI in a subprocess), and the text handling all answers go through."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_adapter
from test_serve import SERVE_TARGETS, direct_answer

KIT = str(Path(sys.executable).with_name("kit"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("chat") / "alpha", seed=1, template="vicuna_v1", targets=SERVE_TARGETS)


@pytest.fixture(scope="module")
def image(shapes) -> Path:
    return Path(shapes["root"]) / "images" / "shape_00001.png"


def kit_chat(*args: str, stdin: str | None = None, env: dict | None = None, prefix: tuple[str, ...] = ()):
    return subprocess.run([*prefix, KIT, "chat", *args], check=False, input=stdin, capture_output=True, text=True,
                          env=env or ENV, timeout=300)


def _user(text: str, with_image: bool = False) -> dict:
    return {"role": "user", "content": ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]}


# ----------------------------------------------------------------------------------------- CLI


def test_one_shot_prints_the_greedy_answer_of_the_adapter(adapter, image):
    from kit.infer.images import load_image_file

    r = kit_chat(str(adapter), "--image", str(image), "--prompt", "What shape is it?", "--max-new-tokens", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    want = direct_answer(adapter, [_user("What shape is it?", True)], [load_image_file(image)], 10)
    assert r.stdout == want + "\n"


def test_system_message_and_seed(adapter, image):
    """--system replaces the trained system prompt (the answer is the one direct generation gives
    for that conversation); --seed makes sampled answers repeatable."""
    from kit.infer.images import load_image_file

    system = "You answer in one word."
    r = kit_chat(str(adapter), "--image", str(image), "--prompt", "What shape is it?", "--max-new-tokens", "8", "--system", system)
    assert r.returncode == 0, r.stderr[-2000:]
    want = direct_answer(adapter, [{"role": "system", "content": system}, _user("What shape is it?", True)], [load_image_file(image)], 8)
    assert r.stdout == want + "\n"
    sampled = [kit_chat(str(adapter), "--prompt", "Say something.", "--max-new-tokens", "12", "--temperature", "1.5", "--seed", str(seed))
               for seed in (7, 7, 8)]
    assert all(x.returncode == 0 for x in sampled), sampled[0].stderr[-2000:]
    assert sampled[0].stdout == sampled[1].stdout != sampled[2].stdout


def test_interactive_keeps_history_until_reset(tiny_base, image):
    """Turn 2 is answered with turn 1 in the prompt (and the image attached to turn 2);
    after /reset the first question gets the first answer again; /exit stops reading."""
    from kit.infer.images import load_image_file

    script = f"What is it?\n/image {image}\nAnd the colour?\n/reset\nWhat is it?\n/exit\nnot read\n"
    r = kit_chat(str(tiny_base), "--max-new-tokens", "8", stdin=script)
    assert r.returncode == 0, r.stderr[-2000:]
    first = direct_answer(tiny_base, [_user("What is it?")], [], 8)
    second = direct_answer(tiny_base, [_user("What is it?"), {"role": "assistant", "content": first},
                                       _user("And the colour?", True)], [load_image_file(image)], 8)
    assert r.stdout == f"{first}\n{second}\n{first}\n"
    assert "conversation reset" in r.stderr and "attached" in r.stderr


def test_many_chats_in_a_row_on_a_busy_machine_all_exit_cleanly(tiny_base, image):
    """The generating thread is joined before the interpreter exits: a thread still freeing tensors
    at exit aborted about half of these runs ("terminate called without an active exception",
    SIGABRT) after a right answer, most often while other processes kept the cores busy."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        runs = [kit_chat(str(tiny_base), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "6")
                for _ in range(8)]
    finally:
        for p in busy:
            p.kill()
            p.wait()
    codes = [r.returncode for r in runs]
    assert codes == [0] * len(runs), f"exit codes {codes}: {next(r.stderr for r in runs if r.returncode)[-500:]}"
    assert not any("terminate called" in r.stderr for r in runs)
    assert len({r.stdout for r in runs}) == 1 and runs[0].stdout.strip()


def test_bad_image_is_a_one_line_error(tiny_base, tmp_path):
    r = kit_chat(str(tiny_base), "--image", str(tmp_path / "nope.png"), "--prompt", "hi")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: image file") and "is missing" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = kit_chat(str(tiny_base), "--image", str(tmp_path / "bad.png"), "--prompt", "hi")
    assert r.returncode == 2 and "not an image" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_interactive_bad_image_and_unknown_command_do_not_end_the_chat(tiny_base, tmp_path):
    r = kit_chat(str(tiny_base), "--max-new-tokens", "4", stdin=f"/image {tmp_path / 'nope.png'}\n/what\nhello\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "error: image file" in r.stderr and "unknown command /what" in r.stderr
    assert r.stdout == direct_answer(tiny_base, [_user("hello")], [], 4) + "\n"  # EOF ends after one answer


def test_chat_runs_with_no_network_at_all(tiny_base):
    """`unshare -n` gives the process a network namespace with no interfaces: any connection fails.
    HF_HUB_OFFLINE is left unset so kit has to set it itself."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], check=False, capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not available here (needs root or user namespaces)")
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    r = kit_chat(str(tiny_base), "--prompt", "What is it?", "--max-new-tokens", "4", env=env, prefix=("unshare", "-n"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == direct_answer(tiny_base, [_user("What is it?")], [], 4) + "\n"


# ------------------------------------------------------------------------------------ text core


@pytest.mark.parametrize("split", [1, 2, 3, 100])
def test_text_filter_gives_the_same_text_however_pieces_are_split(split):
    from kit.infer.generation import TextFilter

    def run(text, stop):
        f = TextFilter(stop)
        out = [f.feed(text[i:i + split]) for i in range(0, len(text), split)]
        return "".join(out) + f.finish(), f.stopped

    assert run("  \n A red circle.  \n", ()) == ("A red circle.", False)
    assert run(" A red circle. USER: more", ("USER:",)) == ("A red circle.", True)
    assert run("abcXYdef", ("XYZ", "Yd")) == ("abcX", True)  # the earliest stop wins, a partial one does not
    assert run("abcXY", ("XYZ",)) == ("abcXY", False)  # a stop string's prefix at the end is kept


def test_prompt_follows_the_template_the_model_was_trained_with(tiny_base):
    from kit.base.family import family_for_type
    from kit.base.load import load_processor
    from kit.core.templates import VICUNA_SYSTEM
    from kit.data.prompt_spec import PromptSpec
    from kit.infer.prompts import build_prompt

    proc = load_processor(tiny_base)
    llava = family_for_type("llava")
    turns = [_user("Hi"), {"role": "assistant", "content": "Hello."}, _user("Colour?", True)]
    chat = build_prompt(proc, turns, PromptSpec.choose(proc, llava, None, "Be brief.", "pad"))
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert "<|im_start|>assistant\nHello.<|im_end|>" in chat and chat.endswith("<image>\nColour?<|im_end|>\n<|im_start|>assistant\n")
    vicuna = build_prompt(proc, turns, PromptSpec.choose(proc, llava, "vicuna_v1", None, "pad"))
    assert vicuna == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello.{proc.tokenizer.eos_token}USER: <image>\nColour? ASSISTANT:"
    assert build_prompt(proc, turns, PromptSpec.choose(proc, llava, "plain", None, "pad")) == "<image>"
