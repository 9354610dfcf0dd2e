"""Stage-1 alignment of the mini base on drawn shapes, and the caption test that proves it sees."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from kit.base.family import families
from kit.base.mini import mini_base
from kit.core.errors import KitError
from kit.core.recipes import load_recipe
from kit.data.images import prepare_image
from kit.ingest.shapes import COLOURS, POSITIONS, SHAPES, score_caption, write_shapes_dataset
from kit.train.run import train

# The mini base is a LLaVA (FastVLM) build: its projector lives where the llava family keeps it.
PROJECTOR_PREFIX = families()["llava"].projector[0] + "."
TRAIN_SEED, EVAL_SEED = 0, 1


def extract_projector(model_dir: Path, dest: Path) -> Path:
    tensors = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            # Saved names vary by architecture (llava-hf's legacy layout drops "model."); normalise.
            tensors.update({
                PROJECTOR_PREFIX + k.split("multi_modal_projector.", 1)[1]: fh.get_tensor(k).float().contiguous()
                for k in fh.keys() if "multi_modal_projector." in k
            })
    if not tensors:
        raise KitError(f"{model_dir}: no projector weights found")
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest), metadata={"format": "pt", "made_by": "kit base align-mini"})
    return dest


@torch.no_grad()
def caption_images(model_dir: Path, images: list[Path], batch_size: int = 16, max_new_tokens: int = 24) -> list[str]:
    """Greedy stage-1 captions (`plain` template: the image alone is the prompt)."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    newline_ids = [i for t, i in proc.tokenizer.get_vocab().items() if "\n" in proc.tokenizer.convert_tokens_to_string([t])]
    out = []
    for i in range(0, len(images), batch_size):
        chunk = [prepare_image(p, "pad", proc.image_processor) for p in images[i : i + batch_size]]
        inputs = proc(text=["<image>"] * len(chunk), images=chunk, return_tensors="pt")
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=newline_ids[:64] or None)
        texts = proc.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [t.split("\n")[0].strip() for t in texts]
    return out


def shapes_accuracy(model_dir: Path, data_dir: Path, echo=print) -> dict[str, float]:
    attrs = json.loads((Path(data_dir) / "attributes.json").read_text())
    ids = sorted(attrs)
    captions = caption_images(model_dir, [Path(data_dir) / "images" / f"{i}.png" for i in ids])
    hits = {"colour": 0, "shape": 0, "position": 0}
    for sid, cap in zip(ids, captions):
        for k, ok in score_caption(cap, attrs[sid]).items():
            hits[k] += ok
    acc = {k: v / len(ids) for k, v in hits.items()}
    chance = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}
    echo(f"held-out captions ({len(ids)} drawn images), e.g. '{captions[0]}'")
    echo(f"{'attribute':10} {'accuracy':>9} {'chance':>7}")
    for k in hits:
        echo(f"{k:10} {acc[k]:9.1%} {chance[k]:7.1%}")
    return acc


def align_mini(work: Path, steps: int = 200, n_train: int = 1600, n_eval: int = 100, projector_out: Path | None = None, echo=print) -> dict[str, float]:
    work = Path(work)
    if (work / "run").exists():
        raise KitError(f"{work}/run already exists; choose another --work folder")
    train_data = write_shapes_dataset(work / "train", n_train, seed=TRAIN_SEED)
    eval_dir = Path(write_shapes_dataset(work / "heldout", n_eval, seed=EVAL_SEED)["root"])
    recipe = load_recipe("mini-pretrain", [f"train.max_steps={steps}"])
    run = train(recipe, base="mini-raw", data=train_data["pretrain"], out=str(work / "run"), echo=echo)
    proj = extract_projector(run, work / "mini_projector.safetensors")
    if projector_out is not None:
        extract_projector(run, Path(projector_out))
        echo(f"aligned projector written to {projector_out}")
    echo(f"projector: {proj}")
    return shapes_accuracy(run, eval_dir, echo=echo)


def evaluate_mini(model: Path | None, n_eval: int = 100, echo=print) -> dict[str, float]:
    model = Path(model) if model else mini_base(aligned=True)
    with tempfile.TemporaryDirectory() as tmp:
        eval_dir = Path(write_shapes_dataset(Path(tmp), n_eval, seed=EVAL_SEED)["root"])
        return shapes_accuracy(model, eval_dir, echo=echo)
