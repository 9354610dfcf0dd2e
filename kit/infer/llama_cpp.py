"""Greedy answers from a `kit export` folder through llama.cpp itself: llama-cpp-python's bindings
of the LLM and of its multimodal library (libmtmd), driven as llama.cpp's own CLI drives them.
mtmd tokenizes the prompt around its media marker, encodes the image with the mmproj, evaluates
the chunks; each answer token is the argmax of the step's logits (no sampler: nothing but the
model decides). `kit eval EXPORT_DIR` and `kit export --eval` answer through here.

The prompt is the one the export card records (`export.prompt`: the trained format rendered
around a question marker, with the processor's image placeholder), so llama.cpp is asked exactly
what transformers was asked; images are padded or cropped as in training before llama.cpp sees them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.data.images import pad_to_square

LLAMA_CPP_HINT = "install llama-cpp-python (`bash setup.sh --llama-cpp`, or `pip install llama-cpp-python`)"
QUESTION = "\u27e6Q\u27e7"  # where the question goes in the recorded prompt


def require_llama_cpp(what: str) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise KitError(f"{what} runs the GGUF files in llama.cpp: {LLAMA_CPP_HINT}")


@dataclass(frozen=True)
class ExportPrompt:
    """The trained prompt format as the export card records it."""

    with_image: str  # QUESTION where the question goes, `image_token` where the image goes
    text_only: str
    image_token: str
    image_aspect: str  # pad | crop | none, as training prepared images
    pad_color: tuple[int, int, int]
    stops: tuple[str, ...]  # texts that end an answer (eos, end-of-turn markers)

    def to_json(self) -> dict:
        return {"with_image": self.with_image, "text_only": self.text_only, "image_token": self.image_token,
                "image_aspect": self.image_aspect, "pad_color": list(self.pad_color), "stops": list(self.stops)}

    @classmethod
    def from_json(cls, d: dict) -> ExportPrompt:
        return cls(d["with_image"], d["text_only"], d["image_token"], d["image_aspect"], tuple(d["pad_color"]),
                   tuple(d["stops"]))


@dataclass(frozen=True)
class ExportFolder:
    """What an export folder holds: its GGUF files and the prompt format they answer to."""

    path: Path
    llm: Path
    mmproj: Path | None
    prompt: ExportPrompt
    card: Card

    @classmethod
    def read(cls, path: Path) -> ExportFolder:
        path = Path(path)
        card = Card.read(path)
        if card is None or card.kind != "export":
            raise KitError(f"{path} is not a `kit export` folder (no kit.json with kind 'export')")
        export = card.model_extra.get("export") or {}
        if "prompt" not in export:
            raise KitError(f"{path}: its card records no prompt format (exported by an older kit); export it again "
                           "with `kit export`")
        files = list(export.get("files", {}))
        llm = [f for f in files if not f.startswith("mmproj-")]
        mmproj = [f for f in files if f.startswith("mmproj-")]
        for f in files:
            if not (path / f).is_file():
                raise KitError(f"{path}: {f}, named in its kit.json, is missing; export it again")
        if len(llm) != 1:
            raise KitError(f"{path}: kit.json names {len(llm)} LLM GGUF files; expected one")
        return cls(path, path / llm[0], path / mmproj[0] if mmproj else None, ExportPrompt.from_json(export["prompt"]), card)


_SILENT = []  # the callback must outlive every call llama.cpp makes to it


def _quiet(llama_cpp, mtmd) -> None:
    """mtmd logs every image it encodes to stderr; Llama(verbose=False) does not reach it."""
    if not _SILENT:
        _SILENT.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
    for setter in ("mtmd_log_set", "mtmd_helper_log_set"):
        if hasattr(mtmd, setter):
            getattr(mtmd, setter)(_SILENT[0], None)


class LlamaCppRuntime:
    """An LLM GGUF (and an mmproj GGUF, or None) loaded in llama.cpp on the CPU; greedy decoding
    that ends at the end-of-sequence token or any single-token text of `stops`."""

    def __init__(self, llm_file: Path, mmproj_file: Path | None, stops: tuple[str, ...] = (), n_ctx: int = 4096):
        require_llama_cpp("running a GGUF export")
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.lib, self.mtmd, self.mmproj_file = llama_cpp, mtmd, mmproj_file
        threads = os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=str(llm_file), n_ctx=n_ctx, n_batch=min(n_ctx, 2048), verbose=False,
                                   seed=0, n_threads=threads)
        self.ctx = None
        if mmproj_file is not None:
            _quiet(llama_cpp, mtmd)
            params = mtmd.mtmd_context_params_default()
            params.use_gpu = False
            params.print_timings = False
            params.n_threads = threads
            self.ctx = mtmd.mtmd_init_from_file(str(mmproj_file).encode(), self.llm.model, params)
            if not self.ctx:
                raise KitError(f"llama.cpp could not load {mmproj_file}")
        self.stop_ids = self._stop_ids(stops)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def sees_images(self) -> bool:
        return self.ctx is not None

    def _stop_ids(self, stops: tuple[str, ...]) -> set[int]:
        ids = {self.llm.token_eos()}
        for s in stops:
            toks = self.llm.tokenize(s.encode(), add_bos=False, special=True)
            if len(toks) == 1:  # a special token; longer stop texts are cut from the answer's text
                ids.add(toks[0])
        return ids

    def greedy(self, text: str, image_png: bytes | None, max_new_tokens: int) -> list[int]:
        """Greedy token ids for a prompt holding mtmd's marker where the image goes."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        if self.ctx is None:
            if image_png is not None:
                raise KitError("a text-only export (no mmproj) cannot answer about an image")
            self.llm.eval(self.llm.tokenize(text.encode(), add_bos=True, special=True))
        else:
            self._eval_multimodal(text, image_png)
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self.logits()))
            out.append(tok)
            if tok in self.stop_ids:
                break
            self.llm.eval([tok])
        return out

    def tokenize_chunks(self, text: str, image_png: bytes | None):
        """mtmd's chunks of a prompt (text tokens, then the image's, around its marker) and the image
        bitmaps they hold; free both with `free_chunks`."""
        mtmd = self.mtmd
        bitmaps = []
        if image_png is not None:
            buf = (ctypes.c_uint8 * len(image_png)).from_buffer_copy(image_png)
            bitmaps.append(mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(image_png), False))
        inp = mtmd.mtmd_input_text()
        raw = text.encode()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps)) != 0:
            self.free_chunks(chunks, bitmaps)
            raise KitError("llama.cpp's mtmd could not tokenize the prompt")
        return chunks, bitmaps

    def free_chunks(self, chunks, bitmaps) -> None:
        self.mtmd.mtmd_input_chunks_free(chunks)
        for b in bitmaps:
            self.mtmd.mtmd_bitmap_free(b)

    def _eval_multimodal(self, text: str, image_png: bytes | None) -> None:
        mtmd, lib = self.mtmd, self.lib
        chunks, bitmaps = self.tokenize_chunks(text, image_png)
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                ch = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(ch) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                    self.llm.eval([ptr[j] for j in range(n.value)])
                else:
                    n_past = lib.llama_pos(0)
                    if mtmd.mtmd_helper_eval_chunk_single(self.ctx, self.llm._ctx.ctx, ch, lib.llama_pos(self.llm.n_tokens),
                                                          lib.llama_seq_id(0), self.llm.n_batch, False,
                                                          ctypes.byref(n_past)) != 0:
                        raise KitError(f"llama.cpp could not evaluate the image with {self.mmproj_file}")
                    self.llm.n_tokens = n_past.value
        finally:
            self.free_chunks(chunks, bitmaps)

    def logits(self) -> np.ndarray:
        """The last evaluated position's logits."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(self.llm.n_vocab(),)).copy()

    def close(self) -> None:
        if self.ctx is not None:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()


class LlamaCppModel(LlamaCppRuntime):
    """One export folder in llama.cpp, asked in the prompt format its card records."""

    def __init__(self, folder: ExportFolder, n_ctx: int = 4096):
        self.folder = folder
        super().__init__(folder.llm, folder.mmproj, folder.prompt.stops, n_ctx=n_ctx)

    def prompt(self, question: str, with_image: bool) -> str:
        p = self.folder.prompt
        if with_image:
            return p.with_image.replace(p.image_token, self.mtmd.mtmd_default_marker().decode()).replace(QUESTION, question)
        return p.text_only.replace(QUESTION, question)

    def answer(self, question: str, image=None, max_new_tokens: int = 32) -> tuple[str, list[int]]:
        """The greedy answer to `question` about `image` (a PIL image, prepared here as in
        training; None for a text question): its text (cut at the first stop text) and token ids."""
        ids = self.greedy(self.prompt(question, image is not None), self._png(image) if image is not None else None,
                          max_new_tokens)
        text = self.llm.detokenize([t for t in ids if t not in self.stop_ids]).decode("utf-8", errors="replace")
        for s in self.folder.prompt.stops:
            text = text.split(s)[0] if s else text
        return text.strip(), ids

    def _png(self, image) -> bytes:
        p = self.folder.prompt
        image = image.convert("RGB")
        if p.image_aspect == "pad":  # as training did; "crop" is the image encoder's own resize and crop
            image = pad_to_square(image, p.pad_color)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()
