"""POPE and CHAIR on probes built from two annotated sets, for a model and its base side by side.

    .venv/bin/python benchmarks/hallucination_probes.py ADAPTER_OR_MODEL [--base BASE] [--out DIR]

Sets (written into --out, default a temporary folder):
- medical: `kit data sample medical` (real images from pydicom / scikit-image / matplotlib, their
  captions, findings and boxes), probed with the medical vocabulary;
- coco-style: four scikit-image photographs (astronaut, camera man, cat, coffee cup) written as a
  COCO captions + instances pair with boxes drawn by hand here, probed with the general vocabulary.
Each set runs `kit data probes`, then `kit eval MODEL --baseline BASE` and prints its tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

KIT = str(Path(sys.executable).with_name("kit"))

# COCO-style records: image name -> (captions, [(category, [x, y, w, h])]), boxes in pixels.
PHOTOS = {
    "astronaut": (["An astronaut in a white spacesuit poses in front of a flag.", "A woman in a space suit smiles."],
                  [("person", [130, 20, 340, 492])]),
    "camera": (["A man stands in a park with a camera on a tripod.", "A photographer looks through his camera outside."],
               [("person", [150, 40, 230, 470])]),
    "chelsea": (["A ginger cat sits looking to the side.", "Close-up of a tabby cat's face."], [("cat", [30, 10, 400, 290])]),
    "coffee": (["A cup of coffee on a saucer seen from above.", "A white cup full of coffee with a spoon."],
               [("cup", [140, 40, 330, 300]), ("spoon", [330, 150, 200, 80])]),
}
CATEGORIES = ["person", "cat", "cup", "spoon"]


def coco_style(root: Path) -> tuple[Path, Path, Path]:
    import skimage.data
    from PIL import Image

    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, captions, instances = [], [], []
    for i, (name, (texts, boxes)) in enumerate(PHOTOS.items(), 1):
        pixels = getattr(skimage.data, name)()
        Image.fromarray(pixels).convert("RGB").save(images_dir / f"{name}.png")
        images.append({"id": i, "file_name": f"{name}.png", "width": pixels.shape[1], "height": pixels.shape[0]})
        captions += [{"id": 10 * i + k, "image_id": i, "caption": t} for k, t in enumerate(texts)]
        instances += [{"id": 100 * i + k, "image_id": i, "category_id": CATEGORIES.index(c) + 1, "bbox": b, "area": b[2] * b[3],
                       "iscrowd": 0} for k, (c, b) in enumerate(boxes)]
    cats = [{"id": k + 1, "name": c, "supercategory": c} for k, c in enumerate(CATEGORIES)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": instances, "categories": cats}))
    return root / "captions.json", root / "instances.json", images_dir


def run(*args: str) -> str:
    r = subprocess.run([KIT, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kit {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--base")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="kit-probes-"))
    base = ["--baseline", a.base] if a.base else []
    med = out / "medical"
    if not med.exists():
        run("data", "sample", "medical", "--out", str(med))
    print(run("data", "probes", str(med), "--out", str(med / "probes.jsonl"), "--vocab", "medical").strip())
    print(run("eval", a.model, "--data", str(med / "probes.jsonl"), *base, "--out", str(med / "predictions.jsonl")))
    coco = out / "coco-style"
    caps, inst, imgs = coco_style(coco)
    print(run("data", "probes", str(caps), "--instances", str(inst), "--images", str(imgs), "--out", str(imgs / "probes.jsonl"),
              "--vocab", "general").strip())
    print(run("eval", a.model, "--data", str(imgs / "probes.jsonl"), *base, "--out", str(coco / "predictions.jsonl")))


if __name__ == "__main__":
    main()
