"""The model's own answers as the rejected side (RLAIF-V style, with kit's claim check as the
judge): each grounded answer's prompt is put to a trained model, greedily; an answer the check
flags becomes `rejected` against the grounded one. Runs on this machine, like `kit eval`."""

from __future__ import annotations

from pathlib import Path

import torch

from kit.core.errors import KitError
from kit.core.precision import to_model
from kit.data.images import ImageProblem, open_rgb
from kit.infer.generation import pad_id, stop_ids
from kit.infer.load import load_for_inference
from kit.infer.prompts import prepare

MAX_NEW_TOKENS = 96


def messages_of(prompt: list[dict], n_images: int) -> list[dict]:
    """LLaVA turns -> chat messages, the images opening the first question (as kit trains them)."""
    out = []
    for j, turn in enumerate(prompt):
        role = "user" if turn["from"] in ("human", "user") else "assistant"
        text = turn["value"].replace("<image>", "").strip()
        if j == 0 and n_images:
            out.append({"role": role, "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": text}]})
        else:
            out.append({"role": role, "content": text})
    return out


def model_answers(model_path: Path, answers, image_folder: Path, max_new_tokens: int = MAX_NEW_TOKENS, echo=print) -> list[str]:
    """The model's greedy answer to each Answer's prompt. KitError for a folder that is not a model
    or adapter kit can load, or an image that cannot be read."""
    loaded = load_for_inference(Path(model_path))
    model, processor = loaded.model, loaded.processor
    tok = processor.tokenizer
    stop = stop_ids(model, tok)
    out = []
    for i, a in enumerate(answers):
        rel = [a.image] if isinstance(a.image, str) and a.image else []
        try:
            images = [open_rgb(Path(image_folder) / r) for r in rel]
        except ImageProblem as e:
            raise KitError(f"answer '{a.id}': {e}") from None
        inputs = to_model(prepare(processor, loaded.spec, messages_of(a.prompt, len(images)), images=images), model)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=stop or None, pad_token_id=pad_id(tok, stop))
        out.append(tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        if (i + 1) % 10 == 0:
            echo(f"  model answers: {i + 1}/{len(answers)}")
    return out
