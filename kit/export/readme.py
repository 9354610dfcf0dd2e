"""The README of an export folder: what each file is, how to run it, where it differs from kit."""

from __future__ import annotations

from typing import Any

from kit.data.prompt_spec import PromptSpec


def readme(name: str, llm_file: str, mmproj_file: str | None, export: dict[str, Any], spec: PromptSpec,
           evaluation: dict[str, Any] | None = None) -> str:
    quant = export["quant"]
    lines = [
        f"# {name} for llama.cpp and Ollama",
        "",
        "Written by `kit export`; `kit.json` says from what, how it was merged and verified.",
        "",
        f"- `{llm_file}`: the language model ({export['llm']['arch']} architecture, {quant}; "
        f"tokenizer {export['llm']['tokenizer']}{', pre-tokenizer ' + export['llm']['pre_tokenizer'] if export['llm']['pre_tokenizer'] else ''}).",
    ]
    if mmproj_file:
        lines.append(f"- `{mmproj_file}`: the vision tower and projector (llama.cpp's mmproj, always f16).")
    lines += [
        "- `Modelfile`: Ollama's recipe for the same files, with the prompt format the model was trained with, its "
        "system prompt and stop strings.",
        "",
        "## Run",
        "",
        "```bash",
    ]
    if mmproj_file:
        lines += [
            f"llama-mtmd-cli -m {llm_file} --mmproj {mmproj_file} --image scan.png -p 'What is shown?' --temp 0",
            f"llama-server -m {llm_file} --mmproj {mmproj_file} --host 127.0.0.1 --port 8080   # OpenAI-compatible",
        ]
    else:
        lines.append(f"llama-server -m {llm_file} --host 127.0.0.1 --port 8080   # text only: no vision tower was exported")
    lines += [
        f"ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}",
        "```",
        "",
        "`kit generate --base-url http://127.0.0.1:8080/v1` drives such a server (several `--base-url`s spread the work).",
        "",
        "## Where it differs from the model in transformers",
        "",
    ]
    aspect = export.get("image_aspect") or "pad"
    if mmproj_file:
        if aspect == "pad":
            lines.append("- Images: llama.cpp pads a non-square image to a square with the CLIP mean colour and resizes it, "
                         "as LLaVA-1.5 and kit's training did.")
        else:
            lines.append(f"- Images: the model was trained with image aspect '{aspect}', but llama.cpp pads non-square images "
                         "to a square: answers about non-square images can differ from `kit chat`'s.")
        lines.append("- llama.cpp's GELU is the tanh approximation (transformers' projector uses the exact one): "
                     "activations differ in the last digits.")
    if quant != "f16":
        lines.append(f"- {quant} stores the LLM's matrices in fewer bits: answers can differ from f16's; the project's "
                     "llama.cpp test reports how often greedy answers agree.")
    lines += [f"- {note[0].upper()}{note[1:]}." for note in export["llm"].get("notes", [])]
    if spec.system_prompt:
        lines.append("- The system prompt the model was trained with is the Modelfile's SYSTEM; llama-server takes it as "
                     "a system message.")
    if evaluation:
        lines += ["", *evaluation_section(evaluation)]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def evaluation_section(ev: dict[str, Any]) -> list[str]:
    """What `kit export --eval` measured: the HF model and this GGUF on the same items."""
    lines = ["## What quantization cost (measured before writing)", "",
             f"`kit export --eval {ev['data']}`: greedy answers (up to {ev['max_new_tokens']} tokens), metric {ev['metric']}; "
             "the change is GGUF minus HF in points with a paired 95% bootstrap interval.", "",
             "| metric | HF | GGUF | change | 95% interval | n |", "|---|---|---|---|---|---|"]
    hf, gguf, change = ev["hf"], ev["gguf"], ev.get("change") or {}
    counts = {"closed_accuracy": gguf.get("n_closed", 0), "open_recall": gguf.get("n_open", 0),
              "overall": gguf.get("n_closed", 0) + gguf.get("n_open", 0)}
    for label, key in (("closed accuracy", "closed_accuracy"), ("open recall", "open_recall"), ("overall", "overall")):
        c = change.get(key) or {}
        delta = "-" if c.get("change") is None else f"{100 * c['change']:+.1f}"
        ci = "-" if c.get("ci") is None else f"[{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}]"
        lines.append(f"| {label} | {_pct(hf.get(key))} | {_pct(gguf.get(key))} | {delta} | {ci} | {counts[key]} |")
    agree = ev["agreement"]
    lines += ["", f"Answers identical to the HF model's: {_pct(agree['identical'])}% of {agree['n']}; time per item "
              f"{hf['seconds_per_item']:.2f} s (transformers) vs {gguf['seconds_per_item']:.2f} s (llama.cpp)."]
    lines += [f"- {d['id']}: first differs at answer token {d['position']}: HF {d['baseline']}, GGUF {d['export']}"
              for d in agree["differences"]]
    if ev.get("text_only"):
        lines.append("- A text-only export: only the questions without an image were asked.")
    return lines
