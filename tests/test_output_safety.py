"""What kit writes: cards without private paths or secrets, --force only over kit's own folders,
and a final save that is loadable only once complete."""

from __future__ import annotations

import json

import pytest

from kit.core.cards import redacted_command
from kit.core.errors import KitError


def test_cards_record_commands_without_paths_urls_or_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jane-roe-scans").mkdir()
    argv = ["/opt/venv/bin/kit", "adapt", "--recipe", "medical", "--base", "/home/alice/models/llava", "--data", "jane-roe-scans",
            "--set", "generate.base_url=http://user:token@10.0.0.5:8000/v1", "--set", "lora.r=8", "--max-steps", "10",
            "--api-key", "sk-live-123", "--api-key=sk-live-456"]
    got = redacted_command(argv)
    assert got == ("kit adapt --recipe medical --base <path> --data <path> --set generate.base_url=<url> --set lora.r=8 "
                   "--max-steps 10 --api-key <redacted> --api-key=<redacted>")
    for secret in ("alice", "jane", "token", "10.0.0.5", "sk-live"):
        assert secret not in got


def test_merge_force_replaces_only_folders_kit_wrote(tmp_path):
    from kit.merge.adapters import check_out

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    with pytest.raises(KitError, match="holds files kit did not write"):
        check_out(mine, True, [])
    assert (mine / "thesis.docx").read_text() == "years of work"
    kits = tmp_path / "merged"
    kits.mkdir()
    (kits / "kit.json").write_text(json.dumps({"kind": "model"}))
    (kits / "model.safetensors").write_text("x")
    check_out(kits, True, [])  # kit's own output: --force may replace it
    with pytest.raises(KitError, match="pass --force"):
        check_out(kits, False, [])


def test_a_final_save_cut_short_does_not_load(tmp_path, monkeypatch):
    """The file that makes a folder an adapter moves in last: a save killed before it leaves a
    folder kit refuses to load, never weights without their card."""
    import os

    import kit.train.run as run
    from kit.infer.load import folder_kind

    staging, out = tmp_path / "out" / ".final-save", tmp_path / "out"
    staging.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "kit.json", "tokenizer.json"):
        (staging / name).write_text("{}")
    real = os.replace
    moved = []

    def killed_before_commit(src, dst):
        if os.path.basename(dst) in run.COMMIT_FILES:
            raise KeyboardInterrupt  # the kill arrives here
        moved.append(os.path.basename(dst))
        real(src, dst)

    monkeypatch.setattr(run.os, "replace", killed_before_commit)
    with pytest.raises(KeyboardInterrupt):
        run.commit_into(staging, out)
    assert "kit.json" in moved and "adapter_config.json" not in moved
    with pytest.raises(KitError, match="neither a model folder"):
        folder_kind(out)
    monkeypatch.setattr(run.os, "replace", real)
    run.commit_into(staging, out)
    assert folder_kind(out) == "adapter" and not staging.exists()
