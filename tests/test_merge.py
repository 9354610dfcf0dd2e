"""kit merge: one adapter into its base (verified against the unmerged model, faithful to QLoRA's
4-bit base) and several adapters combined exactly in ΔW space; plain transformers / PEFT load the
results; bad input fails in one line with nothing written.

Adapters are made here with PEFT on the tiny base (init_lora_weights=False, so ΔW != 0, and a
perturbed projector copy, so losing the projector would show) and carry the card kit's training
writes (base path + fingerprint, recipe with quantization)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kit.core import cards
from helpers import make_adapter, run_cli
from test_cli_errors import assert_clean_failure
from kit.merge.single import merge, verification_inputs
from kit.merge.multi import merge_adapters

PROJ = "model.multi_modal_projector."


def deltas_of(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per module straight from the files (alpha/r, or alpha/√r with rslora): no PEFT involved."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in sd.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            out[module + ".weight"] = scale * sd[key.replace("lora_A", "lora_B")].float() @ a.float()
    return out


def projector_of(adapter: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    return {k[k.index(PROJ):]: v for k, v in sd.items() if PROJ in k}


def params(folder: Path) -> dict[str, torch.Tensor]:
    """Canonical parameter names, whatever layout transformers wrote to disk."""
    from transformers import AutoModelForImageTextToText

    return {k: v.detach().clone() for k, v in AutoModelForImageTextToText.from_pretrained(folder).state_dict().items()}


def adapter_logits(base: Path, adapter: Path, inputs: dict, quantized: bool = False) -> torch.Tensor:
    from peft import PeftModel

    from kit.merge.single import load_base, logits_of

    return logits_of(PeftModel.from_pretrained(load_base(base, torch.float32, "nf4" if quantized else "full"), str(adapter)), inputs)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    other_base = root / "other-base"
    shutil.copytree(tiny_base, other_base)
    # Same weights, config re-serialised: a different fingerprint, as after any edit of the base.
    (other_base / "config.json").write_text(json.dumps(json.loads((other_base / "config.json").read_text()), indent=1))
    return {
        "a": make_adapter(tiny_base, root / "a", seed=1),
        # Different rank, scaling rule and targets: none of it matters in ΔW space.
        "b": make_adapter(tiny_base, root / "b", seed=2, r=2, alpha=4, rslora=True, targets=["q_proj", "v_proj"]),
        "q": make_adapter(tiny_base, root / "q", seed=3, quantization="nf4"),
        "other": make_adapter(other_base, root / "other", seed=4),
    }


@pytest.fixture(scope="module")
def linear(adapters, tmp_path_factory) -> Path:
    return merge_adapters([adapters["a"], adapters["b"]], tmp_path_factory.mktemp("linear") / "m", [0.6, 0.4], echo=lambda m: None)


def _inputs(tiny_base: Path, adapter: Path) -> dict:
    from kit.base.load import load_processor

    return verification_inputs(load_processor(tiny_base), cards.Card.read(adapter), tiny_base)[0]


# --------------------------------------------------------------------------------- one adapter


def test_merge_matches_the_adapter_model_for_both_precisions(tiny_base, adapters, tmp_path):
    from kit.merge.single import logits_of
    from kit.base.load import load_model

    lines = []
    deq = merge(adapters["a"], tmp_path / "deq", echo=lines.append)
    full = merge(adapters["a"], tmp_path / "full", base_precision="full", echo=lambda m: None)
    assert any("dequantized and full are the same" in line for line in lines)
    inputs = _inputs(tiny_base, adapters["a"])
    want = adapter_logits(tiny_base, adapters["a"], inputs)
    for out in (deq, full):
        card = json.loads((out / "kit.json").read_text())
        assert card["kind"] == "model" and card["merge"]["base_precision"] == "full"
        assert card["base"]["fingerprint"] == cards.describe_source(tiny_base)["fingerprint"]
        assert card["merge"]["adapters"][0]["path"] == str(adapters["a"].resolve())
        assert card["verification"]["max_abs_logit_diff"] < 1e-3 and card["verification"]["argmax_agreement"] == 1.0
        # The adapter changes the model far more than the merge drifts: the check can see a lost delta.
        assert card["verification"]["adapter_effect_max_abs_logit"] > 100 * card["verification"]["max_abs_logit_diff"]
        got = logits_of(load_model(out), inputs)
        assert (got - want).abs().max() < 1e-3
    merged = params(deq)
    for k, v in projector_of(adapters["a"]).items():
        assert torch.equal(merged[k], v), k  # the trained projector, not the base's


def test_nf4_adapter_default_merge_is_more_faithful_than_full(tiny_base, adapters, tmp_path):
    deq = merge(adapters["q"], tmp_path / "deq", echo=lambda m: None)
    # Merging into weights the adapter never saw drifts by design; let it through to measure it.
    full = merge(adapters["q"], tmp_path / "full", base_precision="full", tolerance=10.0, echo=lambda m: None)
    d = json.loads((deq / "kit.json").read_text())["verification"]
    f = json.loads((full / "kit.json").read_text())["verification"]
    print(f"\nnf4 adapter: dequantized max|Δlogit| {d['max_abs_logit_diff']:.3g} agreement {d['argmax_agreement']:.3f}; "
          f"full max|Δlogit| {f['max_abs_logit_diff']:.3g} agreement {f['argmax_agreement']:.3f}")
    assert "4-bit" in d["reference"]
    assert d["max_abs_logit_diff"] < f["max_abs_logit_diff"]
    assert d["argmax_agreement"] >= f["argmax_agreement"]
    # Independently of the card: the dequantized merge reproduces the 4-bit adapter model.
    from kit.merge.single import logits_of
    from kit.base.load import load_model

    inputs = _inputs(tiny_base, adapters["q"])
    want = adapter_logits(tiny_base, adapters["q"], inputs, quantized=True)
    assert (logits_of(load_model(deq), inputs) - want).abs().max() < (logits_of(load_model(full), inputs) - want).abs().max()
    config = json.loads((deq / "config.json").read_text())
    assert "quantization_config" not in config


def test_merged_folder_loads_in_plain_transformers_without_kit(tiny_base, adapters, tmp_path):
    from kit.merge.single import logits_of
    from kit.base.load import load_model

    out = merge(adapters["a"], tmp_path / "m", echo=lambda m: None)
    inputs = _inputs(tiny_base, adapters["a"])
    torch.save(inputs, tmp_path / "inputs.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
AutoProcessor.from_pretrained({str(out)!r})
m = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()
x = torch.load({str(tmp_path / 'inputs.pt')!r})
with torch.no_grad():
    logits = m(**x).logits[x["attention_mask"].bool()]
torch.save(logits, {str(tmp_path / 'logits.pt')!r})
assert not any(k == "kit" or k.startswith("kit.") for k in sys.modules), "kit was imported"
assert not any(k == "peft" or k.startswith("peft.") for k in sys.modules), "peft was imported"
"""
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    there = torch.load(tmp_path / "logits.pt")
    here = logits_of(load_model(out), inputs)
    assert there.shape == here.shape and (there - here).abs().max() < 1e-5


# ------------------------------------------------------------------------------ several adapters


def test_linear_merge_is_the_exact_weighted_sum_of_deltas(tiny_base, adapters, linear):
    base, got = params(tiny_base), params(linear)
    da, db = deltas_of(adapters["a"]), deltas_of(adapters["b"])
    assert set(db) < set(da)  # b targets fewer modules: the union is merged
    for k in base:
        if PROJ in k:
            want = 0.6 * projector_of(adapters["a"])[k] + 0.4 * projector_of(adapters["b"])[k]
        else:
            want = base[k] + 0.6 * da.get(k, 0) + 0.4 * db.get(k, 0)
        assert torch.allclose(got[k], want, atol=1e-5, rtol=0), k
    card = json.loads((linear / "kit.json").read_text())
    assert card["merge"]["method"] == "linear" and card["merge"]["weights"] == [0.6, 0.4]
    assert card["merge"]["deviation_from_linear"] is None
    assert card["verification"]["max_abs_logit_diff"] < 1e-3


def test_as_adapter_truncation_is_reported_and_vanishes_at_full_rank(tiny_base, adapters, linear, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from kit.infer.load import load_for_inference

    # a has rank 4 and b rank 2 on q/v: every combined ΔW has rank <= 6.
    exact = merge_adapters([adapters["a"], adapters["b"]], tmp_path / "r6", [0.6, 0.4], rank=6, as_adapter=True, echo=lambda m: None)
    lossy = merge_adapters([adapters["a"], adapters["b"]], tmp_path / "r1", [0.6, 0.4], rank=1, as_adapter=True, echo=lambda m: None)
    t6 = json.loads((exact / "kit.json").read_text())["merge"]["truncation"]
    t1 = json.loads((lossy / "kit.json").read_text())["merge"]["truncation"]
    assert t6["max"] < 1e-5 and t1["max"] > 0.1
    assert len(t1["per_module"]) == 14 and max(t1["per_module"].values()) == t1["max"]
    assert json.loads((exact / "adapter_config.json").read_text())["r"] == 6
    # Plain PEFT on the plain base gives back the linear merge.
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_base), str(exact)).merge_and_unload()
    want = params(linear)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-5, rtol=0), k
    loaded = load_for_inference(exact, device="cpu")  # kit finds the base from the card alone
    assert loaded.kind == "adapter" and loaded.base.path.resolve() == tiny_base.resolve()


def test_ties_and_dare_run_and_differ_from_linear(tiny_base, adapters, linear, tmp_path):
    pair = [adapters["a"], adapters["b"]]
    ties = merge_adapters(pair, tmp_path / "ties", [0.6, 0.4], method="ties", density=0.5, echo=lambda m: None)
    dare = merge_adapters(pair, tmp_path / "dare", [0.6, 0.4], method="dare", density=0.5, seed=1, echo=lambda m: None)
    dare2 = merge_adapters(pair, tmp_path / "dare2", [0.6, 0.4], method="dare", density=0.5, seed=1, echo=lambda m: None)
    lin, t, d = params(linear), params(ties), params(dare)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(t[key], lin[key]) and not torch.allclose(d[key], lin[key]) and not torch.allclose(t[key], d[key])
    untouched = "model.language_model.embed_tokens.weight"
    assert torch.equal(t[untouched], lin[untouched]) and torch.equal(d[untouched], lin[untouched])
    for out in (ties, dare):
        card = json.loads((out / "kit.json").read_text())
        assert card["merge"]["deviation_from_linear"]["max"] > 0.1
        assert card["verification"]["max_abs_logit_diff"] < 1e-3
    assert all(torch.equal(v, params(dare2)[k]) for k, v in d.items())  # seeded


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "case, expected",
    [
        ("other_base", r"was trained on base .* merge only adapters of one base"),
        ("missing_adapter", r"nope does not exist or is not a folder"),
        ("missing_weights", r"broken: no adapter_model\.safetensors; the folder is incomplete"),
        ("weights_not_number", r"--weights: 'x' is not a number"),
        ("weights_count", r"--weights has 3 values for 2 adapters"),
        ("weights_negative_sum", r"sum to -0\.2; they must sum to a positive number"),
        ("weights_nan", r"every weight must be a finite number"),
        ("weights_negative_projector", r"negative weights cannot mix the projector"),
        ("svd_without_rank", r"--method svd needs --rank"),
        ("rank_zero", r"--rank 0: give a rank >= 1"),
        ("tolerance_exceeded", r"merge verification failed: max \|Δlogit\| .* > tolerance 0 .*4-bit.*nothing was written"),
        ("out_not_empty", r"already exists and is not empty"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(capsys, adapters, tmp_path, case, expected):

    a, b = str(adapters["a"]), str(adapters["b"])
    out = tmp_path / "sub" / "out"
    args = {
        "other_base": [a, str(adapters["other"])],
        "missing_adapter": [str(tmp_path / "nope")],
        "missing_weights": [a, str(tmp_path / "broken")],
        "weights_not_number": [a, b, "--weights", "0.6,x"],
        "weights_count": [a, b, "--weights", "0.6", "--weights", "0.3,0.1"],
        "weights_negative_sum": [a, b, "--weights", "0.3,-0.5"],
        "weights_nan": [a, b, "--weights", "nan,1"],
        "weights_negative_projector": [a, b, "--weights", "1.5,-0.5"],
        "svd_without_rank": [a, b, "--method", "svd"],
        "rank_zero": [a, b, "--as-adapter", "--rank", "0"],
        "tolerance_exceeded": [str(adapters["q"]), "--base-precision", "full", "--tolerance", "0"],
        "out_not_empty": [a],
    }[case]
    if case == "missing_weights":
        (tmp_path / "broken").mkdir()
        for name in ("adapter_config.json", "kit.json"):
            shutil.copy(adapters["b"] / name, tmp_path / "broken" / name)
    if case == "out_not_empty":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    assert_clean_failure(run_cli(capsys, "merge", *args, "--out", str(out)), expected, out,
                         kept=["keep.txt"] if case == "out_not_empty" else None)


def test_cli_merges_two_adapters_with_comma_weights(capsys, adapters, linear, tmp_path):
    code, stdout, err = run_cli(capsys, "merge", str(adapters["a"]), str(adapters["b"]), "--weights", "0.6,0.4", "--out", str(tmp_path / "m"))
    assert code == 0, err
    assert stdout.strip() == str(tmp_path / "m")
    assert "verify: max |Δlogit|" in err
    got, want = params(tmp_path / "m"), params(linear)
    assert all(torch.equal(v, want[k]) for k, v in got.items())
