"""Each fact resolved once per command: the base's config.json is read by kit once over a whole
`kit finetune`, a whole `kit export ADAPTER` (merge and verification included) and `kit export`
of a full model, and the loads that follow are handed the config kit read instead of reading it again."""

from __future__ import annotations

import builtins
import io
import traceback
from pathlib import Path

import pytest

from helpers import as_flags, run_cli, tiny


class Reads:
    """Every open() of one file in this process, split by who opened it: kit itself, or a library
    kit called (transformers' processor loading reads config.json to learn the model type)."""

    def __init__(self, target: Path):
        self.target = target.resolve()
        self.by_kit: list[str] = []
        self.by_libraries: list[str] = []

    def spy(self, real):
        def opened(file, *args, **kwargs):
            if isinstance(file, (str, Path)) and Path(file).resolve() == self.target:
                frames = [f for f in traceback.extract_stack()[:-1] if "/kit/" in f.filename or "site-packages" in f.filename]
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-8:]))
                # The innermost frame that is not the standard library decides: kit's own module or a library's.
                (self.by_kit if "/kit/" in frames[-1].filename else self.by_libraries).append(where)
            return real(file, *args, **kwargs)

        return opened

    def clear(self) -> None:
        self.by_kit.clear()
        self.by_libraries.clear()


@pytest.fixture
def reads(tiny_base, monkeypatch) -> Reads:
    counter = Reads(Path(tiny_base) / "config.json")
    monkeypatch.setattr(builtins, "open", counter.spy(builtins.open))
    monkeypatch.setattr(io, "open", counter.spy(io.open))
    return counter


def test_finetune_and_export_read_the_base_config_once(tiny_base, shapes, tmp_path, capsys, reads):
    adapter = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", shapes["instruct"],
                           "--out", str(adapter), "--max-steps", "1", *as_flags(tiny(lora=True)))
    assert code == 0, err
    assert len(reads.by_kit) == 1, reads.by_kit
    # Before: kit 5 (plan, dataset, model load, two card fingerprints), transformers 3 (one of them the
    # model load, now handed kit's config). What remains is AutoProcessor finding the model type.
    assert len(reads.by_libraries) <= 2, reads.by_libraries
    finetune = (len(reads.by_kit), len(reads.by_libraries))

    reads.clear()
    code, _, err = run_cli(capsys, "export", str(adapter), "--out", str(tmp_path / "export"))
    assert code == 0, err
    assert len(reads.by_kit) == 1, reads.by_kit
    assert reads.by_libraries == [], reads.by_libraries  # before: kit 6, transformers 2
    export = (len(reads.by_kit), len(reads.by_libraries))

    reads.clear()
    code, _, err = run_cli(capsys, "export", str(tiny_base), "--out", str(tmp_path / "export-base"))
    assert code == 0, err
    assert len(reads.by_kit) == 1, reads.by_kit  # the folder's kind and its base are one opening
    print(f"config.json reads (kit, libraries): finetune {finetune}, export ADAPTER {export}, "
          f"export MODEL {(len(reads.by_kit), len(reads.by_libraries))}")


def test_one_prompt_rule_for_training_inference_merge_and_serving(tiny_base, tmp_path, monkeypatch):
    """kit.core.templates.template_for is the only rule: every stage asks PromptSpec, and for one
    adapter inference, merge verification and serving get the same spec."""
    from kit.base.family import family_for_type
    from kit.base.folder import AdapterInfo
    from kit.core.templates import PREFIX, template_for
    from kit.data.prompt_spec import PromptSpec
    from kit.infer.load import load_for_inference, processor_for
    from kit.merge import verify
    from kit.serve.pool import load_pool
    from helpers import make_adapter

    assert template_for(None, "chat", has_chat_template=True) == "chat"  # a checkpoint kit did not train: its own template
    assert template_for(None, "chat", has_chat_template=False) == "vicuna_v1"
    assert template_for(None, "prefix") == template_for("chat", "prefix") == PREFIX
    assert template_for("vicuna_v1", "prefix") == "vicuna_v1" and template_for("plain", "chat") == "plain"  # as trained

    adapter = make_adapter(tiny_base, tmp_path / "a", seed=1, template="vicuna_v1")
    loaded = load_for_inference(adapter)
    assert loaded.spec.template == "vicuna_v1" and loaded.spec.chat_template and loaded.spec.image_aspect == "pad"
    info = AdapterInfo.open(adapter)
    seen = []
    real = PromptSpec.of_card
    monkeypatch.setattr(PromptSpec, "of_card", classmethod(lambda cls, *a, **k: seen.append(real(*a, **k)) or seen[-1]))
    verify.verification_inputs(processor_for(adapter, info.base), info.card, info.base)
    monkeypatch.undo()
    assert seen == [loaded.spec]
    pool = load_pool(adapter, echo=lambda m: None)
    assert pool.served["a"].spec == loaded.spec
    base_spec = pool.served[tiny_base.name].spec
    assert base_spec == PromptSpec.choose(loaded.processor, family_for_type("llava"), None, None, "pad")
    assert base_spec.template == "chat"  # the base's card names no recipe: its own chat template
