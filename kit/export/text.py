"""The LLM of a merged model as a llama.cpp GGUF: architecture metadata, tokenizer, weights.

Names come from the gguf library's tensor-name map, metadata keys from its writer. What the
library leaves to its converter is done here: LLaMA-arch q/k rows reordered for llama.cpp's rope
(HF rotates halves, llama.cpp interleaved pairs), added special tokens marked as control tokens
(so a prompt's `<|im_end|>` is one token), and the pre-tokenizer named from tokenizer.json.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import gguf
import torch
import yaml

from kit.base.family import Family
from kit.core.errors import KitError
from kit.core.files import read_json
from kit.export.tensors import FILE_TYPES, add_tensor, finish, map_name

ARCHES = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "llama" -> MODEL_ARCH.LLAMA


@cache
def _pretokenizers() -> list[dict[str, Any]]:
    return yaml.safe_load(resources.files("kit.export").joinpath("pretokenizers.yaml").read_text())


def pretokenizer(tok_json: dict[str, Any], where: str) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    digits = bool(steps) and kinds[0] == "Digits" and steps[0].get("individual_digits", False)
    rest = steps[1:] if digits else steps
    split = None
    if len(rest) == 2 and rest[0].get("type") == "Split" and rest[1].get("type") == "ByteLevel" and not rest[1].get("use_regex", True):
        split = (rest[0].get("pattern") or {}).get("Regex")
    elif not (len(rest) == 1 and rest[0].get("type") == "ByteLevel" and rest[0].get("use_regex", True)):
        rest = None
    if rest is not None:
        for row in _pretokenizers():
            if row["split"] == split and row["digits"] == digits:
                return row["pre"]
    raise KitError(f"{where}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one kit knows llama.cpp's "
                   f"name for ({', '.join(r['pre'] for r in _pretokenizers())}); llama.cpp would split text differently")


def _vocab(tok_dir: Path, tok_json: dict[str, Any], n_rows: int) -> tuple[str, list[bytes], list[float], list[int], str | None]:
    """(tokenizer model, tokens, scores, types, pre-tokenizer) padded to the embedding's rows."""
    tok_file = tok_dir / "tokenizer.json"
    model = tok_json.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab, pre = gguf.vocab.LlamaHfVocab(tok_dir), None
    elif model.get("type") == "BPE" and (tok_json.get("decoder") or {}).get("type") == "ByteLevel":
        vocab, pre = gguf.vocab.BpeVocab(tok_dir), pretokenizer(tok_json, str(tok_file))
    else:
        raise KitError(f"{tok_file}: a {model.get('type')} tokenizer; kit exports byte-level BPE (GPT-2 style) and "
                       "SentencePiece-style BPE (byte fallback) tokenizers")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    if vocab.tokenizer_model == "llama":
        # llama.cpp's SentencePiece-style tokenizer merges the adjacent pair whose result scores
        # highest; the library's reader leaves every score equal, so the merge order is lost.
        # Scoring each merge's result by its rank gives back transformers' BPE order.
        ids = model.get("vocab") or {}
        for rank, merge in enumerate(model.get("merges") or []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            i = ids.get(left + right)
            if i is not None and i < len(scores) and scores[i] == -1000.0:
                scores[i] = -float(rank)
    for added in tok_json.get("added_tokens") or []:
        i = added["id"]
        if i < len(types):
            types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if len(tokens) > n_rows:
        raise KitError(f"{tok_file}: {len(tokens)} tokens but the model's embedding has {n_rows} rows")
    for i in range(len(tokens), n_rows):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return vocab.tokenizer_model, tokens, scores, types, pre


def tokenizer_notes(tok_json: dict[str, Any]) -> list[str]:
    """Where llama.cpp will tokenize differently from transformers, said in the card."""
    pre = tok_json.get("pre_tokenizer") or {}
    if (tok_json.get("model") or {}).get("byte_fallback") and pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
        return ["this tokenizer (a non-legacy Llama tokenizer) adds no space marker to text that follows a special token "
                "or an image, while llama.cpp's SentencePiece-style tokenizer adds one ('\u2581') to every such piece of "
                "text: prompts in llama.cpp hold one token more after each special token and image"]
    return []


def _reorder_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order within each head -> llama.cpp's interleaved pairs (LLaMA arch)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind not in ("default", None):
        raise KitError(f"config.json text_config.rope_parameters.rope_type '{kind}': kit does not export rope scaling to GGUF yet; "
                       "export a model whose LLM uses plain rope (LLaVA-1.5's Vicuna/Llama, Mistral, Qwen2)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def write_text(model, family: Family, tok_dir: Path, path: Path, quant: str, name: str, chat_template: str | None) -> dict[str, Any]:
    """Write the LLM of `model` (a loaded merged model) to `path`. Returns what the card records."""
    cfg = model.config.text_config
    arch_name = family.gguf.text.get(cfg.model_type)
    if arch_name is None:
        raise KitError(f"the LLM is a '{cfg.model_type}' model; kit exports {', '.join(family.gguf.text)} LLMs to GGUF")
    arch = ARCHES[arch_name]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    llm, head = model.get_submodule(family.llm), model.get_submodule(family.head)
    n_rows = llm.get_input_embeddings().weight.shape[0]
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise KitError(f"{tok_dir}: no tokenizer.json; kit exports fast (tokenizer.json) tokenizers only")
    tok_json = read_json(tok_file, "tokenizer", fix="restore it from the checkpoint you downloaded")
    tok_model, tokens, scores, types, pre = _vocab(tok_dir, tok_json, n_rows)

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_file_type(FILE_TYPES["f16" if quant == "q4_k_m" else quant])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_rows)
    w.add_tokenizer_model(tok_model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.vocab.SpecialVocab(tok_dir, load_merges=tok_model == "gpt2", n_vocab=n_rows)
    special.chat_template = chat_template
    special.add_to_gguf(w, quiet=True)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))
    state = {f"model.{k}": v for k, v in llm.state_dict().items()}
    if not tied:
        state.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    for key, tensor in state.items():
        mapped = map_name(names, key, "LLM")
        if arch == gguf.MODEL_ARCH.LLAMA and key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _reorder_rope_rows(tensor, n_head)
        elif arch == gguf.MODEL_ARCH.LLAMA and key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _reorder_rope_rows(tensor, n_kv)
        add_tensor(w, mapped, tensor, quant=quant)
    finish(w)
    return {"arch": gguf.MODEL_ARCH_NAMES[arch], "tokenizer": tok_model, "pre_tokenizer": pre, "tokens": n_rows,
            "tied_embeddings": tied, "notes": tokenizer_notes(tok_json)}
