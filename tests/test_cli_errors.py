"""Bad input through the CLI: one line naming file/line/field, a non-zero exit, no output folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import run_cli


def assert_clean_failure(result: tuple[int, str, str], expected: str, out: Path, kept: list[str] | None = None) -> None:
    """One `error:` line matching `expected`, exit 2, nothing on stdout; `out` keeps exactly `kept`
    (the user's files), or without it neither `out` nor the parent folders it would have made exist."""
    import re

    code, stdout, err = result
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(expected, lines[0]), lines[0]
    assert code == 2 and stdout == ""
    if kept is not None:
        assert sorted(p.name for p in out.iterdir()) == sorted(kept)
    else:
        assert not out.parent.exists()  # not even a temp folder or a parent was left behind


def _data(tmp_path: Path, records: list[dict], name="data.json") -> Path:
    Image.new("RGB", (16, 16), (0, 90, 200)).save(tmp_path / "ok.png")
    f = tmp_path / name
    f.write_text("\n".join(json.dumps(r) for r in records) if name.endswith(".jsonl") else json.dumps(records))
    return f


def _rec(sid="a", image="ok.png", answer="Blue."):
    return {"id": sid, "image": image, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": answer}]}


def _one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_image", r"data\.json\[1\]: sample 'b': image file .*nope\.png is missing"),
        ("corrupt_image", r"data\.json\[1\]: sample 'b': image file .*bad\.png is not an image kit reads"),
        ("broken_json_line", r"data\.jsonl:2: invalid JSON"),
        ("over_long", r"data\.json\[0\]: sample 'a': image tokens would be truncated"),
        ("unknown_recipe_key", r"unknown key 'train\.learning_rate'"),
        ("not_llava_base", r"is not a vision-language model \(model_type 'llama'"),
        ("unknown_recipe", r"unknown recipe 'nope'; available: .*llava15-finetune"),
        ("resume_without_checkpoint", r"--resume: no checkpoint-\* folder"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(capsys, tmp_path, tiny_base, tiny_parts, case, expected):
    recipe, base, extra = "llava15-finetune", str(tiny_base), []
    if case == "missing_image":
        data = _data(tmp_path, [_rec(), _rec("b", "nope.png")])
    elif case == "corrupt_image":
        (tmp_path / "bad.png").write_bytes(b"garbage")
        data = _data(tmp_path, [_rec(), _rec("b", "bad.png")])
    elif case == "broken_json_line":
        data = _data(tmp_path, [_rec()], "data.jsonl")
        data.write_text(data.read_text() + "\n{\"id\": \"b\", oops}\n")
    elif case == "over_long":
        data = _data(tmp_path, [_rec(answer="word " * 400)])
        extra = ["--set", "data.max_length=40"]  # the system line + 16 image tokens don't fit
    elif case == "unknown_recipe_key":
        data = _data(tmp_path, [_rec()])
        extra = ["--set", "train.learning_rate=1e-4"]
    elif case == "not_llava_base":
        data = _data(tmp_path, [_rec()])
        base = str(tiny_parts[1])
    elif case == "unknown_recipe":
        data, recipe = _data(tmp_path, [_rec()]), "nope"
    else:
        data = _data(tmp_path, [_rec()])
        (tmp_path / "out").mkdir()
        extra = ["--resume"]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", "--recipe", recipe, "--base", base, "--data", str(data), "--out", str(out), *extra)
    assert code == 2
    import re

    assert re.search(expected, _one_error_line(err)), err
    assert not out.exists() or not any(out.iterdir())


def test_base_build_from_bad_parts_leaves_nothing(capsys, tmp_path, tiny_parts):
    vision, llm = tiny_parts
    code, _, err = run_cli(capsys, "base", "build", "--vision", str(llm), "--llm", str(llm), "--out", str(tmp_path / "b"))
    assert code == 2 and "--vision" in _one_error_line(err)
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.*")), "temporary build folder left behind"


def test_recipe_stage_mismatch_is_explained(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--recipe", "llava15-finetune", "--data", str(tmp_path / "x.json"))
    assert code == 2 and "run it with `kit finetune`" in _one_error_line(err)


def test_help_does_not_import_torch():
    import subprocess

    code = "import sys; sys.argv=['kit','--help']\nfrom kit.cli.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\nprint('ok')"
    for argv in ("['kit','--help']", "['kit','finetune','--help']", "['kit','recipes','list']"):
        r = subprocess.run([sys.executable, "-c", code.replace("['kit','--help']", argv)], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (argv, r.stderr[-500:])


def test_adapters_list_shows_each_adapter_with_its_held_out_change(capsys, tmp_path):
    from kit.core.cards import Card
    from kit.core.recipes import load_recipe

    good = tmp_path / "medical-1"
    good.mkdir()
    (good / "adapter_config.json").write_text("{}")
    Card.new("adapter", made_by="tests", recipe=load_recipe("medical"), steps=60, base={"path": "/bases/mini"},
             evaluation={"base": {"overall": 0.278}, "adapted": {"overall": 0.611}}).write(good)
    bare = tmp_path / "other"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    code, out, err = run_cli(capsys, "adapters", "list", "--root", str(tmp_path))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("medical-1") and "held-out 27.8 -> 61.1" in lines[0] and "/bases/mini" in lines[0]
    assert lines[1].startswith("other") and "held-out" not in lines[1]
