"""`kit merge`: fold a LoRA adapter into its base and write a standalone HF-native model.

A QLoRA adapter learned against dequant(nf4(W)), not W. The faithful merge (the default,
`base_precision="dequantized"`) loads the base 4-bit exactly as training did, dequantizes it and
merges into that; `"full"` merges into the original weights and drifts (DESIGN.md: "Merging").

Every merge is verified before it becomes visible: the written folder is loaded back and its
logits on a few samples are compared with the unmerged reference (the adapter on the base as it was
trained: for nf4, the 4-bit base). Max |Δlogit| and argmax (greedy next-token) agreement go into the
card; past `tolerance` the merge fails and nothing is left at `out`. Outputs are written into a
temp folder beside `out` and renamed into place at the end.

Several adapters: kit.merge.multi.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kit.core import cards
from kit.core.errors import KitError

# Max |Δlogit| a merge may drift from its reference. Wide enough for the expected drift of a QLoRA
# adapter merged into full-precision weights (0.24 measured on a 7B) and for bf16 rounding; a
# wrong merge (lost projector, wrong scaling) moves logits by whole units.
DEFAULT_TOLERANCE = 0.5
PRECISIONS = ("dequantized", "full")
N_SAMPLES = 4
_DRAWN_PROMPT = "Describe the image briefly."


# -------------------------------------------------------------------------------- output folder


def check_out(out: Path, force: bool, inputs: list[Path]) -> None:
    """Raise KitError when `out` cannot be written: non-empty without `force`, a file, or an input."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KitError(f"--out {out} is a file; give a folder path")
    resolved = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if resolved == p or p.is_relative_to(resolved):
            raise KitError(f"--out {out} would replace an input ({p}); choose another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KitError(f"--out {out} already exists and is not empty; choose another folder or pass --force to replace it")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temp folder beside `out` that replaces `out` when the block ends cleanly; on any error it
    is removed, together with parent folders this created, so a failed merge leaves nothing."""
    out = Path(out)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merging-"))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        raise


# ------------------------------------------------------------------------------------ adapters


def adapter_info(path: Path) -> dict[str, Any]:
    """base, fingerprint, card, quantization, train dtype and peft config of an adapter folder.

    Raises KitError for a folder that is not an adapter, a missing/changed base, or broken files.
    """
    from kit.infer.load import ADAPTER_CONFIG, adapter_base, folder_kind
    from kit.train.run import compute_dtype

    path = Path(path)
    if folder_kind(path) != "adapter":
        raise KitError(f"{path} is a full model, not an adapter; there is nothing to merge")
    if not any(path.glob("adapter_model.*")):
        raise KitError(f"adapter {path}: no adapter_model.safetensors; the folder is incomplete (copy it again from the run's output)")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise KitError(f"{path / ADAPTER_CONFIG}:{e.lineno}: invalid JSON ({e.msg}); restore the file") from None
    base, fingerprint, card = adapter_base(path)
    recipe = card.get("recipe") or {}
    precision = (recipe.get("train") or {}).get("precision", "auto")
    return {
        "path": path,
        "base": base,
        "fingerprint": fingerprint or cards.describe_source(base)["fingerprint"],
        "card": card,
        "quantization": recipe.get("quantization") or "none",
        "dtype": compute_dtype(precision),
        "config": config,
    }


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(base: Path, dtype: torch.dtype, form: str):
    """The base in eval mode: form 'nf4' (4-bit, as QLoRA trained), 'dequantized' (nf4 then back
    to `dtype`: the weights a QLoRA adapter actually learned against) or 'full'."""
    from kit.base.parts import load_model
    from kit.train.run import quantization_config

    dev = device()
    if form == "full":
        model = load_model(base, dtype=dtype).to(dev)
    else:
        # 4-bit weights are placed at load time; on CPU bitsandbytes' slow fallback serves.
        model = load_model(base, dtype=dtype, quantization_config=quantization_config(dtype),
                           device_map={"": dev.index or 0} if dev.type == "cuda" else None)
        if form == "dequantized":
            model.dequantize()
    return model.eval()


def processor_for(adapter: Path, base: Path):
    from kit.infer.load import PROCESSOR_FILES
    from kit.base.parts import load_processor

    return load_processor(adapter if any((adapter / f).is_file() for f in PROCESSOR_FILES) else base)


# -------------------------------------------------------------------------------- verification


def _settings(card: dict[str, Any], base: Path, tokenizer) -> tuple[str, str | None, str]:
    """(template, system prompt, image aspect) the adapter was trained with."""
    from kit.base.parts import image_aspect_of

    data = ((card.get("recipe") or {}).get("data")) or {}
    template = data.get("template") or ("chat" if tokenizer.chat_template else "vicuna_v1")
    return template, data.get("system_prompt"), data.get("image_aspect") or image_aspect_of(base)


def _data_samples(card: dict[str, Any], aspect: str, image_processor, n: int) -> list[tuple[Any, list[tuple[str, str]]]]:
    """Up to n (image, first exchange) pairs from the adapter's training data, when still there."""
    from kit.data.dataset import default_image_folder
    from kit.data.formats import load_samples
    from kit.data.images import ImageProblem, prepare_image, resolve_image

    data_path = (card.get("data") or {}).get("path")
    if not data_path or not Path(data_path).is_file():
        return []
    folder = ((card.get("recipe") or {}).get("data") or {}).get("image_folder")
    out = []
    try:
        samples = load_samples(Path(data_path))
        folder = Path(folder) if folder else default_image_folder(Path(data_path))
        for s in samples:
            if len(out) == n:
                break
            if s.problem is None and s.image and len(s.turns) >= 2 and s.turns[1][0] == "assistant":
                out.append((prepare_image(resolve_image(folder, s.image), aspect, image_processor), s.turns[:2]))
    except (KitError, ImageProblem, OSError):
        return []
    return out


def verification_inputs(processor, card: dict[str, Any], base: Path, n: int = N_SAMPLES) -> tuple[dict[str, torch.Tensor], str]:
    """A fixed batch of n image + conversation samples in the training format, and where they came
    from: the adapter's training data when its files are still there, else drawn shapes (seeded)."""
    from kit.ingest.shapes import caption, draw_scene
    from kit.base.parts import IMAGE_TOKEN
    from kit.core.templates import TemplateError, render

    template, system, aspect = _settings(card, base, processor.tokenizer)
    samples = _data_samples(card, aspect, processor.image_processor, n)
    source = f"{len(samples)} samples of {card['data']['path']}" if samples else ""
    if len(samples) < n:
        rng = random.Random(0)
        size = (getattr(processor.image_processor, "crop_size", None) or {}).get("height") or 224
        drawn = 0
        while len(samples) < n:
            image, attrs = draw_scene(rng, size)
            samples.append((image, [("user", f"{IMAGE_TOKEN}\n{_DRAWN_PROMPT}"), ("assistant", caption(attrs, rng))]))
            drawn += 1
        source = ", ".join(s for s in (source, f"{drawn} drawn shape images") if s)
    texts = []
    for _, turns in samples:
        try:
            texts.append(render(template, turns, processor.tokenizer, IMAGE_TOKEN, system).text)
        except TemplateError as e:
            raise KitError(f"cannot render verification samples with template '{template}': {e}") from None
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        inputs = processor(text=texts, images=[img for img, _ in samples], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    return dict(inputs), f"{source} ({template} template)"


@torch.no_grad()
def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 CPU logits at every attended position: [positions, vocab]."""
    first = next(p for p in model.parameters() if p.is_floating_point())  # 4-bit weights are uint8: skipped
    dev, dtype = first.device, first.dtype
    feed = {k: (v.to(dev, dtype) if k == "pixel_values" else v.to(dev)) for k, v in inputs.items()}
    logits = model(**feed).logits  # [B, T, V]
    return logits[inputs["attention_mask"].bool().to(dev)].float().cpu()


def compare(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    diff = (reference - got).abs()
    return {
        "max_abs_logit_diff": float(diff.max()) if torch.isfinite(diff).all() else float("inf"),
        "mean_abs_logit_diff": float(diff.mean()) if torch.isfinite(diff).all() else float("inf"),
        "argmax_agreement": float((reference.argmax(-1) == got.argmax(-1)).float().mean()),
        "positions": int(reference.shape[0]),
    }


def check_drift(numbers: dict[str, float], tolerance: float, reference: str, hint: str = "") -> None:
    """KitError (nothing written) when the output's logits drift past `tolerance` from `reference`."""
    if not numbers["max_abs_logit_diff"] <= tolerance:
        raise KitError(
            f"merge verification failed: max |Δlogit| {numbers['max_abs_logit_diff']:.4g} > tolerance {tolerance:g} "
            f"vs {reference} (argmax agreement {numbers['argmax_agreement']:.3f}); nothing was written{hint}"
        )


def describe_numbers(numbers: dict[str, float]) -> str:
    return (f"max |Δlogit| {numbers['max_abs_logit_diff']:.3g} (mean {numbers['mean_abs_logit_diff']:.2g}), "
            f"argmax agreement {numbers['argmax_agreement']:.3f} over {numbers['positions']} positions")


def source_entry(info: dict[str, Any]) -> dict[str, Any]:
    """How a card names an input adapter: path, fingerprint, file hash, how it was trained."""
    files = [p for p in Path(info["path"]).iterdir() if p.name.startswith("adapter_") and p.is_file()]
    recipe = info["card"].get("recipe") or {}
    return {**cards.describe_source(info["path"]), "sha256": cards.hash_files(files), "recipe": recipe.get("name"),
            "quantization": info["quantization"], "steps": info["card"].get("steps")}


# ------------------------------------------------------------------------------------- merging


def merge(adapter: Path, out: Path, base_precision: str = "dequantized", tolerance: float = DEFAULT_TOLERANCE,
          force: bool = False, echo=print) -> Path:
    """Merge one adapter into its base; write model + processor + card at `out`. Returns `out`.

    Raises KitError for a folder that is not an adapter, a missing or changed base, an `out` that
    exists (without `force`), or a merge whose logits drift past `tolerance` from the adapter model.
    """
    if base_precision not in PRECISIONS:
        raise KitError(f"--base-precision {base_precision}: choose {' or '.join(PRECISIONS)}")
    if not tolerance >= 0:
        raise KitError(f"--tolerance {tolerance}: give a number >= 0 (max |Δlogit|)")
    info = adapter_info(Path(adapter))
    check_out(out, force, [info["path"], info["base"]])
    from peft import PeftModel

    base, dtype, quantized = info["base"], info["dtype"], info["quantization"] == "nf4"
    notes = []
    if not quantized and base_precision == "dequantized":
        notes.append("the adapter was not trained on a quantized base: dequantized and full are the same merge")
    precision = base_precision if quantized else "full"
    processor = processor_for(info["path"], base)
    inputs, samples = verification_inputs(processor, info["card"], base)

    # The reference is the model as trained: the adapter unmerged on the base it saw (4-bit for QLoRA).
    reference = PeftModel.from_pretrained(load_base(base, dtype, "nf4" if quantized else "full"), str(info["path"])).eval()
    ref_logits = logits_of(reference, inputs)
    with reference.disable_adapter():
        effect = compare(ref_logits, logits_of(reference, inputs))["max_abs_logit_diff"]
    ref_name = "the adapter on the 4-bit nf4 base it was trained on" if quantized else "the unmerged adapter on its base"
    if quantized:
        del reference
        reference = PeftModel.from_pretrained(load_base(base, dtype, precision), str(info["path"]))
    merged = reference.merge_and_unload()
    del reference
    for note in notes:
        echo(f"note: {note}")
    echo(f"merging {info['path']} into {base} ({'dequantized nf4' if precision == 'dequantized' else 'full-precision'} weights, {str(dtype).removeprefix('torch.')})")

    with staged(out) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        del merged
        numbers = compare(ref_logits, logits_of(load_base(tmp, dtype, "full"), inputs))
        echo(f"verify: {describe_numbers(numbers)} vs {ref_name}; the adapter itself moves logits by up to {effect:.3g}")
        hint = "; --base-precision dequantized merges into the weights the adapter was trained against" if quantized and precision == "full" else ""
        check_drift(numbers, tolerance, ref_name, hint)
        recipe = dict(info["card"].get("recipe") or {})
        if recipe:
            recipe["quantization"] = "none"  # the merged model is plain weights; the source's is under merge.adapters
        cards.write_card(tmp, cards.new_card(
            "model", made_by="kit merge", base=cards.describe_source(base), recipe=recipe,
            merge={"method": "single", "adapters": [source_entry(info)], "base_precision": precision,
                   "dtype": str(dtype).removeprefix("torch.")},
            verification={"reference": ref_name, "samples": samples, "tolerance": tolerance,
                          "adapter_effect_max_abs_logit": effect, **numbers},
            notes=notes,
        ))
    return Path(out)


def parse_weights(values: list[str] | None) -> list[float] | None:
    """`--weights 0.6,0.4` and/or repeated `--weights 0.6 --weights 0.4` as floats."""
    if not values:
        return None
    out = []
    for part in (p.strip() for v in values for p in v.split(",")):
        try:
            out.append(float(part))
        except ValueError:
            raise KitError(f"--weights: '{part}' is not a number; give e.g. --weights 0.6,0.4") from None
    return out


def run(adapters: list[Path], out: Path, *, weights: list[str] | None = None, method: str = "linear", rank: int | None = None,
        as_adapter: bool = False, density: float = 0.5, seed: int = 0, base_precision: str = "dequantized",
        tolerance: float | None = None, force: bool = False, echo=print) -> Path:
    """What `kit merge` does: one adapter into its base, or several combined (kit.merge.multi)."""
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    parsed = parse_weights(weights)
    if len(adapters) == 1:
        if parsed is not None or method != "linear" or rank is not None or as_adapter:
            raise KitError("--weights, --method, --rank and --as-adapter combine several adapters; give two or more adapter folders")
        return merge(adapters[0], out, base_precision, tol, force, echo)
    from kit.merge.multi import merge_adapters

    return merge_adapters(adapters, out, parsed, method, rank, as_adapter, density, seed, base_precision, tol, force, echo)
