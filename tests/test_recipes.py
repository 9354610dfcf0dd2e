"""Every shipped recipe validates; overrides are typed; mistakes name the key."""

from __future__ import annotations

import pytest

from kit.core.errors import KitError
from kit.core.recipes import available_recipes, load_recipe

SHIPPED = sorted(available_recipes())


def test_the_llava15_recipes_ship():
    assert {"llava15-pretrain", "llava15-finetune", "llava15-lora", "mini-pretrain"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name
    assert r.train.trainable
    assert load_recipe(name, embedded=True).name == name  # its CPU overrides validate too


def test_llava15_hyperparameters_match_the_reference():
    pt, ft, lora = load_recipe("llava15-pretrain"), load_recipe("llava15-finetune"), load_recipe("llava15-lora")
    assert (pt.train.trainable, pt.train.lr, pt.train.global_batch_size, pt.data.template) == (["projector"], 1e-3, 256, "plain")
    assert (ft.train.lr, ft.train.global_batch_size, ft.data.template, ft.data.image_aspect) == (2e-5, 128, "vicuna_v1", "pad")
    assert (lora.lora.r, lora.lora.alpha, lora.train.lr, lora.train.projector_lr) == (128, 256, 2e-4, 2e-5)
    for r in (pt, ft, lora):
        assert (r.train.warmup_ratio, r.train.scheduler, r.train.weight_decay, r.data.max_length) == (0.03, "cosine", 0.0, 2048)


def test_overrides_are_parsed_against_the_schema():
    r = load_recipe("llava15-lora", ["train.lr=3e-4", "lora.targets=[q_proj, v_proj]", "lora=null", "train.trainable=[projector]"])
    assert r.train.lr == 3e-4 and r.lora is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("train.lr=fast", "'train.lr': Input should be a valid number"),
        ("data.template=alpaca", "'data.template': Input should be 'plain', 'vicuna_v1' or 'chat'"),
        ("train.global_batch_size=10", "not a multiple of batch_size"),
        ("quantization=nf4", None),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    if message is None:  # nf4 with LoRA present is valid
        assert load_recipe("llava15-lora", [override]).quantization == "nf4"
        with pytest.raises(KitError, match="quantization needs lora"):
            load_recipe("llava15-finetune", [override])
        return
    with pytest.raises(KitError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe("llava15-lora", [override])


def test_yaml_syntax_error_names_the_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: x\nstage: finetune\ntrain:\n  lr: [1\n")
    with pytest.raises(KitError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(str(f))


def test_embedded_overrides_apply_only_on_request_and_user_overrides_win():
    gpu, cpu = load_recipe("medical"), load_recipe("medical", embedded=True)
    assert gpu.quantization == "nf4" and gpu.lora.r == 64
    assert cpu.quantization == "none" and cpu.lora.r == 16 and cpu.generate.types == ["conversation"]
    assert load_recipe("medical", ["lora.r=8"], embedded=True).lora.r == 8


def test_recipe_loading_owns_the_stage_check_and_the_embedded_rule_reading_the_file_once(monkeypatch, tmp_path):
    """One read of the file per command: the stage check and the embedded settings are decided on
    the recipe as loaded, not by loading it again; the rule sees the user's overrides."""
    import kit.core.recipes as recipes
    from kit.base.mini import embedded_rule

    reads = []
    real = recipes._read_yaml
    monkeypatch.setattr(recipes, "_read_yaml", lambda path: reads.append(path) or real(path))
    said = []
    rule = embedded_rule(None, said.append)
    r = load_recipe("medical", ["lora.r=8"], rule, stage="adapt")
    assert len(reads) == 1
    assert r.quantization == "none" and r.lora.r == 8  # CPU here, the mini base: embedded settings, the user's override wins
    assert said == ["embedded mini base on CPU: applying the recipe's `embedded` settings"]
    elsewhere = load_recipe("medical", [], embedded_rule(str(tmp_path), said.append), stage="adapt")
    assert elsewhere.quantization == "nf4" and len(said) == 1  # another base: the recipe as written, nothing said
    assert load_recipe("llava15-lora", [], embedded_rule(None, said.append)).lora.r == 128 and len(said) == 1  # no embedded section
    with pytest.raises(KitError, match=r"recipe 'medical' is for `kit adapt`, not `kit finetune`; run it with `kit adapt`"):
        load_recipe("medical", stage="finetune")


def test_a_base_url_with_credentials_is_written_without_them():
    """recipe.yaml and the cards that embed the recipe never hold a URL's userinfo or query; the
    recipe in memory keeps them, so the run itself can authenticate."""
    import json

    r = load_recipe("medical", ['generate.base_url=["http://bob:S3CRET@127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1?key=K3Y"]'])
    assert r.generate.base_url[0] == "http://bob:S3CRET@127.0.0.1:8000/v1"
    for written in (r.to_yaml(), json.dumps(r.model_dump(mode="json"))):
        assert "S3CRET" not in written and "bob" not in written and "K3Y" not in written
        assert "http://127.0.0.1:8000/v1" in written and "http://127.0.0.1:8001/v1" in written
