"""`kit export`: a model or adapter as files llama.cpp and Ollama run offline.

An adapter is merged into its base first (kit.merge, verified against the unmerged adapter); the
merged model's LLM becomes `<name>-<quant>.gguf`, its tower + projector `mmproj-<name>-f16.gguf`,
beside an Ollama `Modelfile`, a `kit.json` card and a README. Everything is written into a temp
folder beside `--out` and renamed into place only when all of it succeeded.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kit.base.folder import AdapterInfo, Base
from kit.base.load import load_model, load_processor, model_config
from kit.core import options
from kit.core.cards import Card, describe_source
from kit.core.errors import KitError
from kit.core.files import staged_folder
from kit.data.images import mean_colour
from kit.export.ollama import modelfile, stop_strings, turn_pieces
from kit.export.readme import readme
from kit.export.tensors import check_quant, size_of
from kit.export.text import write_text
from kit.export.vision import check_exportable, write_mmproj
from kit.data.vqa import load_items
from kit.eval.gguf import compare_export
from kit.infer.llama_cpp import LLAMA_CPP_HINT, QUESTION, ExportFolder, ExportPrompt, require_llama_cpp
from kit.data.prompt_spec import PromptSpec
from kit.infer.load import open_folder
from kit.infer.prompts import build_prompt
from kit.merge.adapters import check_out, check_weights
from kit.merge.single import merge_adapter
from kit.merge.verify import DEFAULT_TOLERANCE

FORMATS = options.EXPORT_FORMATS


def quantize_with_llama_cpp(src: Path, dst: Path, kind: str) -> None:
    """k-quants come from llama.cpp's own quantizer (the gguf library only reads them)."""
    import llama_cpp  # optional dependency; only q4_k_m needs it

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise KitError(f"llama.cpp could not quantize {src.name} to {kind}")


def export_prompt(processor, spec: PromptSpec) -> ExportPrompt:
    """The prompt format the card records for llama.cpp evaluation: one user turn rendered by the
    same builder training and `kit chat` use, around a question marker (kit.infer.llama_cpp)."""
    question = [{"type": "text", "text": QUESTION}]
    with_image = build_prompt(processor, [{"role": "user", "content": [{"type": "image"}, *question]}], spec)
    try:
        text_only = build_prompt(processor, [{"role": "user", "content": question}], spec)
    except KitError:  # a caption-only ('plain') or image-first format has no text-only turn
        text_only = ""
    return ExportPrompt(with_image=with_image, text_only=text_only, image_token=getattr(processor, "image_token", "<image>"),
                        image_aspect=spec.image_aspect, pad_color=mean_colour(processor.image_processor),
                        stops=tuple(stop_strings(turn_pieces(processor, spec), processor.tokenizer)))


def check_options(fmt: str, quant: str, *, eval_data: Path | None, max_drop: float | None) -> None:
    """KitError, before anything is merged or written, for an option kit export cannot carry out."""
    if max_drop is not None and eval_data is None:
        raise KitError("--max-drop needs --eval FILE (the items to compare the export and the HF model on)")
    if max_drop is not None and max_drop < 0:
        raise KitError(f"--max-drop {max_drop}: give the points of score the export may lose, 0 or more")
    if eval_data is not None:
        require_llama_cpp("kit export --eval")
        load_items(Path(eval_data))  # a bad line fails before anything is merged or written
    if fmt not in FORMATS:
        raise KitError(f"--format {fmt}: kit exports {', '.join(FORMATS)} (llama.cpp, Ollama); vLLM serves the merged "
                       "HF folder of `kit merge` as it is (README: Deploy)")
    check_quant(quant)
    if quant == "q4_k_m" and importlib.util.find_spec("llama_cpp") is None:
        raise KitError(f"--quant q4_k_m is made by llama.cpp's own quantizer: {LLAMA_CPP_HINT}, or use f16 or q8_0")


def open_source(source: Path, text_only: bool) -> tuple[AdapterInfo | None, Base]:
    """(the adapter, or None for a full model; the base it is exported from). KitError for a folder
    kit cannot load, a missing or changed base, or a family or tower llama.cpp does not run."""
    opened = open_folder(source)  # a missing or changed base fails here, before anything is written
    adapter = opened if isinstance(opened, AdapterInfo) else None
    if adapter is not None:
        check_weights(adapter.path)
    base = adapter.base if adapter is not None else opened
    family = base.family
    if family.gguf is None:
        raise KitError(f"{source}: {family.label} checkpoints are not exported to GGUF by kit; llama.cpp export covers "
                       "the llava family (LLaVA-1.5 layout: CLIP or SigLIP tower, MLP projector, Llama/Mistral/Qwen2 LLM)")
    if not text_only:
        check_exportable(model_config(base), family)  # the base's config: a merge does not change it
    return adapter, base


@dataclass
class GgufFiles:
    """What write_gguf wrote: file names, their sizes, and what each writer reports."""

    llm_file: str
    mmproj_file: str | None
    sizes: dict[str, str]
    text: dict[str, Any]
    vision: dict[str, Any] | None


def write_gguf(model, processor, spec: PromptSpec, folder: Path, *, family, model_dir: Path, name: str, quant: str,
               text_only: bool, echo=print) -> GgufFiles:
    """The LLM as `<name>-<quant>.gguf` (k-quants by llama.cpp's quantizer from an f16 file) and,
    unless `text_only`, the tower + projector as `mmproj-<name>-f16.gguf`, into `folder`."""
    llm_file = f"{name}-{quant}.gguf"
    f16_file = folder / f"{name}-f16.gguf"
    echo(f"writing {llm_file} (LLM)")
    with torch.no_grad():
        text = write_text(model, family, model_dir, path=f16_file if quant == "q4_k_m" else folder / llm_file, quant=quant, name=name,
                          chat_template=spec.chat_template)
    if quant == "q4_k_m":
        quantize_with_llama_cpp(f16_file, folder / llm_file, quant)
        f16_file.unlink()
    sizes = {llm_file: size_of(folder / llm_file)}
    if text_only:
        return GgufFiles(llm_file, None, sizes, text=text, vision=None)
    mmproj_file = f"mmproj-{name}-f16.gguf"
    echo(f"writing {mmproj_file} (vision tower + projector)")
    with torch.no_grad():
        vision = write_mmproj(model, family, processor.image_processor, path=folder / mmproj_file, name=name)
    sizes[mmproj_file] = size_of(folder / mmproj_file)
    return GgufFiles(llm_file, mmproj_file, sizes, text=text, vision=vision)


def export(source: Path, out: Path, fmt: str = options.EXPORT_FORMATS[0], quant: str = options.EXPORT_QUANTS[0], text_only: bool = False, force: bool = False,
           tolerance: float | None = None, echo=print, eval_data: Path | None = None, max_drop: float | None = None) -> Path:
    """Write the export folder (see the module doc). With `eval_data`, evaluate the HF model and the
    written GGUF on those items before anything is moved into place, record both in the card and
    README, and with `max_drop` refuse (nothing written) an export that scores lower beyond it."""
    source = Path(source)
    check_options(fmt, quant, eval_data=eval_data, max_drop=max_drop)
    adapter, base = open_source(source, text_only)
    kind, family = "adapter" if adapter is not None else "model", base.family
    check_out(out, force, [source] + ([base.path] if adapter is not None else []))
    name = source.resolve().name

    with staged_folder(out, replace=force) as tmp:
        model_dir = source
        if kind == "adapter":
            model_dir = tmp / "merged"
            merged = merge_adapter(adapter, model_dir, tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance, echo=echo)
            model, processor, card = merged.model, merged.processor, merged.card
            del merged
        else:
            model = load_model(base, torch.float32).eval()
            processor = load_processor(source)
            card = base.card or Card(kind="model")
        spec = PromptSpec.of_card(card, processor, family, base_aspect=base.image_aspect)

        files = write_gguf(model, processor, spec, folder=tmp, family=family, model_dir=model_dir, name=name, quant=quant,
                           text_only=text_only, echo=echo)
        del model
        llm_file, mmproj_file, written, text = files.llm_file, files.mmproj_file, files.sizes, files.text
        (tmp / "Modelfile").write_text(modelfile(llm_file, mmproj_file, processor, spec=spec), encoding="utf-8")
        prompt = export_prompt(processor, spec)
        export_info = {"format": fmt, "quant": quant, "files": written, "llm": text, "vision": files.vision,
                       "image_aspect": spec.image_aspect, "template": spec.template,
                       "prompt": prompt.to_json()}
        extra: dict[str, Any] = {"export": export_info, "source": describe_source(source) if adapter is not None else base.source()}
        if eval_data is not None:
            folder = ExportFolder(tmp, tmp / llm_file, tmp / mmproj_file if mmproj_file else None, prompt=prompt,
                                  card=Card(kind="export", export=export_info))
            extra["evaluation"] = compare_export(model_dir, folder, Path(eval_data), max_drop=max_drop, echo=echo)
        if kind == "adapter":
            shutil.rmtree(model_dir)
            extra["merge"] = card.model_extra.get("merge")
            extra["verification"] = card.model_extra.get("verification")
        for note in text["notes"]:
            echo(f"note: {note}")
        Card.new("export", made_by="kit export", recipe=card.recipe, notes=text["notes"], **extra).write(tmp)
        (tmp / "README.md").write_text(readme(name, llm_file, mmproj_file, export=export_info, spec=spec, evaluation=extra.get("evaluation")),
                                       encoding="utf-8")
    for f, size in written.items():
        echo(f"  {f}: {size}")
    return Path(out)
