"""Greedy answers from llama.cpp itself (kit's runtime, kit.infer.llama_cpp) and from
transformers on the same prompt and image, for the export agreement checks.

llama.cpp's side is driven at the level its own CLI works: mtmd tokenizes the prompt around the
media marker, encodes the image, evaluates the chunks; the answer is the argmax of each step's
logits (no sampler, so nothing but the model decides).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from kit.infer.llama_cpp import LlamaCppRuntime


class LlamaCpp(LlamaCppRuntime):
    """kit's llama.cpp runtime (kit.infer.llama_cpp) with what the export tests look inside: the
    prompt as llama.cpp tokenizes it and the image embeddings the mmproj makes."""

    def __init__(self, model_file: Path, mmproj_file: Path | None, n_ctx: int = 512):
        super().__init__(model_file, mmproj_file, n_ctx=n_ctx)

    @property
    def marker(self) -> str:
        return self.mtmd.mtmd_default_marker().decode()

    def _logits(self) -> np.ndarray:
        return self.logits()

    def greedy(self, text: str, image: Path | None, max_new_tokens: int) -> list[int]:
        return super().greedy(text, Path(image).read_bytes() if image is not None else None, max_new_tokens)

    def _chunks(self, text: str, image: Path | None):
        return self.tokenize_chunks(text, Path(image).read_bytes() if image is not None else None)

    def prompt_ids(self, text: str, image: Path | None) -> list[int | None]:
        """The prompt as llama.cpp tokenizes it; None for each image position."""
        mtmd = self.mtmd
        chunks, bitmaps = self._chunks(text, image)
        out: list[int | None] = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            ch = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(ch) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                out += [ptr[j] for j in range(n.value)]
            else:
                out += [None] * mtmd.mtmd_input_chunk_get_n_tokens(ch)
        self.free_chunks(chunks, bitmaps)
        return out

    def image_embeddings(self, image: Path) -> np.ndarray:
        """What the mmproj makes of one image: [tokens, LLM hidden]."""
        mtmd = self.mtmd
        chunks, bitmaps = self._chunks(self.marker, image)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            ch = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(ch) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                assert mtmd.mtmd_encode_chunk(self.ctx, ch) == 0
                n = mtmd.mtmd_input_chunk_get_n_tokens(ch)
                d = self.llm.n_embd()
                out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(n * d,)).reshape(n, d).copy()
        self.free_chunks(chunks, bitmaps)
        return out


def hf_greedy(model, processor, text: str, image, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids without image tokens, greedy answer ids) from transformers; `text` holds the
    processor's own image placeholder where the image goes."""
    enc = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    ids = enc["input_ids"][0].tolist()
    image_id = getattr(model.config, "image_token_id", None)
    return [t for t in ids if t != image_id], out[0, enc["input_ids"].shape[1]:].tolist()


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two greedy answers agree, up to the longer one's length."""
    n = max(len(a), len(b))
    return sum(1 for x, y in zip(a, b) if x == y) / n if n else 1.0


def cls_last_features(model, pixel_values: torch.Tensor) -> np.ndarray:
    """A LLaVA's projected image features as llama.cpp builds affected by its issue 25814 compute
    them: CLIP's class token appended after the patches (so every token takes the next one's
    position embedding), the first patch dropped and the class token kept."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    layer = model.config.vision_feature_layer
    n_layers = len(vm.encoder.layers)
    keep = layer if layer >= 0 else n_layers + layer + 1
    with torch.no_grad():
        emb = vm.embeddings
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([patches, emb.class_embedding.expand(1, 1, -1)], 1)
        x = vm.pre_layrnorm(x + emb.position_embedding.weight[: x.shape[1]][None])
        for blk in vm.encoder.layers[:keep]:
            out = blk(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return model.model.multi_modal_projector(x[0, 1:]).numpy()


def align_projector(base: Path, steps: int = 120) -> Path:
    """Train `base`'s projector in place on drawn-shape captions (stage 1, briefly), so its
    answers depend on the image: agreement on answers that ignore the image would prove little."""
    import json
    import random

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kit.ingest.shapes import write_shapes_dataset

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(base)
    paths = write_shapes_dataset(base.parent / "align-data", 64, seed=7, size=32)
    caps = json.loads(Path(paths["captions"]).read_text())
    files = {im["id"]: im["file_name"] for im in caps["images"]}
    pairs = [(Path(paths["root"]) / files[a["image_id"]], a["caption"]) for a in caps["annotations"]]
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3)
    rng, tok = random.Random(0), proc.tokenizer
    newline = tok.convert_tokens_to_ids(tok.tokenize("\n"))[-1]
    for _ in range(steps):
        batch = rng.sample(pairs, 8)
        enc = proc(text=[f"{proc.image_token}\n{c}{tok.eos_token}" for _, c in batch],
                   images=[Image.open(f).convert("RGB") for f, _ in batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        for i in range(len(batch)):
            labels[i, : labels[i].tolist().index(newline) + 1] = -100  # the caption only
        labels[enc["attention_mask"] == 0] = -100
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 3.0, f"the projector did not learn the captions (loss {loss.item():.2f})"
    model.save_pretrained(base)
    return base
