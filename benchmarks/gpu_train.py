"""One-shot GPU check of kit's training path at LLaVA-1.5-7B width: LoRA, QLoRA and full finetuning.

Also benchmark (b) of the adapt issue: peak GPU memory of QLoRA vs 16-bit LoRA vs full finetuning
on the same model, each beside kit's own estimate (kit.base.memory, computed from the config alone).

Builds random-weight parts shaped like CLIP ViT-L/14-336 and LLaMA-2-7B (full width, `--layers`
decoder layers; 8 layers ~ 2 B parameters), assembles them with `kit.base.build.build`, draws a
shapes dataset, then runs `kit.train.train` for each mode and reports per mode: s/step, tokens/s,
peak GPU memory, first/last loss, and (QLoRA) how many linear layers are 4-bit and where.

    PYTHONPATH=/tmp/site python benchmarks/gpu_train.py --tokenizer .whl/tok [--steps 10 --layers 8]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_train.py --tokenizer DIR --tiny --steps 2   # CPU smoke

Writes the results as JSON (--out-json; default $OUT/gpu_train.json, else WORK/gpu_train.json)
after every phase, so a run cut short still leaves what it measured. Exits 1 if any mode failed.
Imports only kit modules that need no gguf/openai/trl/pycocotools at import time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import itertools
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from transformers import TrainerCallback

MODES = ("lora", "qlora", "full")
COMMON = [
    "train.global_batch_size=4", "train.save_steps=100000", "train.logging_steps=1",
    "train.gradient_checkpointing=true", "data.max_length=1024", "train.warmup_ratio=0",
]


def say(*a) -> None:
    print(*a, flush=True)


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ parts


def shapes_for(args) -> tuple[dict, dict, int]:
    """(vision config kwargs, llm config kwargs, data image size)."""
    if args.tiny:
        vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 32, "patch_size": 8}
        llm = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": args.layers or 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 2048}
        return vision, llm, 64
    # CLIP ViT-L/14-336 and LLaMA-2-7B widths; only the LLM depth is cut (--layers).
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768}
    llm = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": args.layers or 8, "num_attention_heads": 32,
           "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    return vision, llm, 336


def build_parts(args, work: Path, timings: dict, info: dict) -> Path:
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from kit.base.build import build
    from kit.core.precision import compute_dtype

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype("auto")  # bf16 on a bf16-capable GPU, fp32 on CPU: what training will use
    vision_kw, llm_kw, _ = shapes_for(args)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)

    t = time.perf_counter()
    with torch.device(dev):
        vision = CLIPVisionModel._from_config(CLIPVisionConfig(**vision_kw), dtype=dtype)
    sync()
    timings["vision_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    vision.save_pretrained(work / "parts" / "vision")
    timings["vision_save_s"] = time.perf_counter() - t
    info["vision_params_M"] = sum(p.numel() for p in vision.parameters()) / 1e6
    del vision
    free_memory()

    cfg = LlamaConfig(
        vocab_size=len(tok), tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **llm_kw,
    )
    t = time.perf_counter()
    with torch.device(dev):
        llm = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    sync()
    timings["llm_init_s"] = time.perf_counter() - t
    info["llm_params_M"] = sum(p.numel() for p in llm.parameters()) / 1e6
    info["llm_layers"] = cfg.num_hidden_layers
    info["llm_vocab"] = cfg.vocab_size
    # What QLoRA must quantize: every decoder linear layer (lm_head is kept in compute dtype).
    info["llm_linear_layers"] = sum(isinstance(m, torch.nn.Linear) for m in llm.model.modules())
    info["llm_linear_layers_with_lm_head"] = sum(isinstance(m, torch.nn.Linear) for m in llm.modules())
    t = time.perf_counter()
    llm.save_pretrained(work / "parts" / "llm")
    tok.save_pretrained(work / "parts" / "llm")
    timings["llm_save_s"] = time.perf_counter() - t
    del llm
    free_memory()
    say(f"parts: vision {info['vision_params_M']:.1f}M, llm {info['llm_params_M']:.1f}M ({cfg.num_hidden_layers} layers, "
        f"{dtype}) in {timings['vision_init_s'] + timings['vision_save_s'] + timings['llm_init_s'] + timings['llm_save_s']:.1f}s")

    t = time.perf_counter()
    base = build(work / "base", work / "parts" / "vision", work / "parts" / "llm", None)
    timings["kit_build_s"] = time.perf_counter() - t
    say(f"kit build: {base} in {timings['kit_build_s']:.1f}s")
    return base


# ------------------------------------------------------------------------------------------ modes


def recipe_for(mode: str, args):
    from kit.core.recipes import load_recipe

    over = COMMON + [f"train.batch_size={args.batch}", f"train.global_batch_size={args.batch}",
                     f"train.max_steps={args.steps}", f"train.num_workers={args.workers}"]
    if mode == "lora":
        return load_recipe("llava15-lora", over)
    if mode == "qlora":
        return load_recipe("llava15-lora", over + ["quantization=nf4", "lora.r=64", "lora.alpha=16"])
    if mode == "full":
        return load_recipe("llava15-finetune", over)
    raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


class Probe(TrainerCallback):
    """Step timestamps, and what the model being trained looks like (4-bit layers, dtypes)."""

    def __init__(self, end_checkpoint: bool = False):
        self.end_checkpoint = end_checkpoint
        self.begin = None
        self.ends: list[float] = []
        self.end = None
        self.model_info: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from kit.base.family import family_of_model

        part_of = family_of_model(model).part_of
        sync()
        self.begin = time.perf_counter()
        four_bit = {"vision": 0, "projector": 0, "llm": 0, "other": 0}
        lm_head_4bit = False
        for name, m in model.named_modules():
            # bitsandbytes' own class only: PEFT's LoRA wrapper around it is also named Linear4bit.
            if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"):
                four_bit[part_of(name) or "other"] += 1
                lm_head_4bit |= "lm_head" in name
        dtypes: dict[str, dict[str, int]] = {}
        for name, p in model.named_parameters():
            key = f"{part_of(name) or 'other'}/{'train' if p.requires_grad else 'frozen'}"
            d = dtypes.setdefault(key, {})
            d[str(p.dtype).removeprefix("torch.")] = d.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
        self.model_info = {
            "linear4bit": four_bit,
            "lm_head_4bit": lm_head_4bit,
            "param_dtypes": dtypes,
            "trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "total_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainer_bf16": bool(args.bf16),
            "trainer_fp16": bool(args.fp16),
            "grad_accum": args.gradient_accumulation_steps,
            "device": str(next(model.parameters()).device),
        }

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.ends.append(time.perf_counter())
        if not self.end_checkpoint and state.global_step >= state.max_steps:
            # HF saves a checkpoint at max_steps whatever save_steps says; at full finetuning of
            # this size that is ~8 GB of weights + ~16 GB of Adam state. The final save still runs.
            control.should_save = False
            return control

    def on_train_end(self, args, state, control, **kwargs):
        sync()
        self.end = time.perf_counter()

    def step_times(self) -> list[float]:
        if self.begin is None:
            return []
        marks = [self.begin, *self.ends]
        return [b - a for a, b in itertools.pairwise(marks)]


def tokens_per_sample(base: Path, data: Path, recipe) -> dict:
    """Non-pad tokens per sample (image tokens included), from the dataset exactly as train() builds it."""
    from kit.data.dataset import build_dataset
    from kit.base.folder import Base
    from kit.base.load import load_processor

    proc = load_processor(base)
    _, report = build_dataset(data, proc, recipe.data.template, recipe.data.max_length,
                              recipe.data.image_aspect or Base.open(base).image_aspect)
    n = report.lengths
    return {"mean": sum(n) / len(n), "min": min(n), "max": max(n), "image_tokens": report.image_tokens, "samples": len(n)}


def run_mode(mode: str, args, base: Path, data: Path, work: Path, info: dict, tokens: dict) -> dict:
    from kit.train.run import train
    from kit.train.logs import read_losses

    res: dict = {"mode": mode, "status": "error"}
    out = work / f"run-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    free_memory()
    probe = Probe(end_checkpoint=args.end_checkpoint)
    t0 = time.perf_counter()
    try:
        recipe = recipe_for(mode, args)
        res["recipe"] = {"name": recipe.name, "quantization": recipe.quantization, "lr": recipe.train.lr,
                         "lora": recipe.lora.model_dump() if recipe.lora else None, "trainable": recipe.train.trainable}
        from kit.base.memory import estimate

        # Batches pad to their longest sample, so the estimate is asked about the longest one.
        res["estimate_GiB"] = estimate(recipe, base, tokens["max"]).total / 2**30
        train(recipe, base=str(base), data=str(data), out=str(out), callbacks=[probe], echo=lambda m: say(f"  [{mode}] {m}"))
        sync()
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one failing mode must not stop the others
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["traceback"] = traceback.format_exc()[-4000:]
        say(f"  [{mode}] FAILED: {res['error'][:500]}")
        del e
    res["wall_s"] = time.perf_counter() - t0
    if probe.begin is not None:
        res["setup_s"] = probe.begin - t0  # data + model load + PEFT/quantization + Trainer init
    if probe.end is not None:
        res["loop_s"] = probe.end - probe.begin
        res["final_save_s"] = t0 + res["wall_s"] - probe.end
    times = probe.step_times()
    res["steps_done"] = len(times)
    res["step_times_s"] = [round(x, 4) for x in times]
    timed = times[2:] if len(times) > 2 else times
    if timed:
        s = sum(timed) / len(timed)
        res["s_per_step"] = s
        res["tokens_per_step"] = tokens["mean"] * args.batch
        res["tokens_per_s"] = tokens["mean"] * args.batch / s
    if torch.cuda.is_available():
        res["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    losses = read_losses(out / "log.csv")
    res["losses"] = [l for _, l in losses]
    if losses:
        res["loss_first"], res["loss_last"] = losses[0][1], losses[-1][1]
    res.update(probe.model_info)

    # Checks: what each mode must look like; a failed check makes the mode fail.
    problems = []
    if res["status"] == "ok":
        if not losses or not all(math.isfinite(l) for _, l in losses):
            problems.append(f"losses missing or not finite: {res['losses']}")
        fb = probe.model_info.get("linear4bit", {})
        if mode == "qlora":
            want = info.get("llm_linear_layers")
            if fb.get("llm") != want:
                problems.append(f"{fb.get('llm')} 4-bit LLM linear layers, expected {want}")
            if fb.get("vision") or fb.get("projector") or fb.get("other") or probe.model_info.get("lm_head_4bit"):
                problems.append(f"4-bit layers outside the LLM decoder: {fb}, lm_head_4bit={probe.model_info.get('lm_head_4bit')}")
        elif sum(fb.values()):
            problems.append(f"unexpected 4-bit layers in {mode}: {fb}")
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not probe.model_info.get("trainer_bf16"):
            problems.append("Trainer is not running in bf16 on a bf16-capable GPU")
    if problems:
        res["status"] = "check-failed"
        res["error"] = "; ".join(problems)
        say(f"  [{mode}] CHECK FAILED: {res['error']}")
    # Keep disk free for the next mode (a full-finetune save is the whole model in fp32).
    if not args.keep:
        for f in out.glob("*.safetensors"):
            f.unlink()
        for ck in out.glob("checkpoint-*"):
            shutil.rmtree(ck, ignore_errors=True)
    del probe
    free_memory()
    # Nothing of this mode may stay alive into the next one (its peak memory would count it).
    res["models_alive_after"] = sum(isinstance(o, torch.nn.Module) and type(o).__name__.endswith("ForConditionalGeneration")
                                    for o in gc.get_objects())
    if torch.cuda.is_available():
        res["allocated_after_GiB"] = torch.cuda.memory_allocated() / 2**30
    return res


# ------------------------------------------------------------------------------------------ report


def fmt(x, spec: str, empty: str = "-") -> str:
    return empty if x is None else format(x, spec)


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(results: list[dict], info: dict) -> str:
    rows = [("mode", "status", "s/step", "tokens/s", "peak GiB", "kit estimate GiB", "estimate/peak", "loss first→last", "4-bit layers")]
    for r in results:
        fb = r.get("linear4bit")
        four = "-" if fb is None else (f"{fb['llm']}/{info.get('llm_linear_layers')} llm, {fb['vision']} vis, {fb['projector']} proj")
        loss = f"{fmt(r.get('loss_first'), '.3f')}→{fmt(r.get('loss_last'), '.3f')}"
        rows.append((r["mode"], r["status"], fmt(r.get("s_per_step"), ".3f"), fmt(r.get("tokens_per_s"), ".0f"),
                     fmt(r.get("peak_alloc_GiB"), ".2f"), fmt(r.get("estimate_GiB"), ".2f"), ratio(r.get("estimate_GiB"), r.get("peak_alloc_GiB")),
                     loss, four))
    by_mode = {r["mode"]: r.get("peak_alloc_GiB") for r in results}
    if by_mode.get("qlora") and by_mode.get("lora") and by_mode.get("full"):
        rows.append(("qlora / lora / full peak", "", "", "", f"1 : {by_mode['lora'] / by_mode['qlora']:.2f} : {by_mode['full'] / by_mode['qlora']:.2f}",
                     "", "", "", ""))
    return render(rows)


def render(rows: list[tuple]) -> str:
    """Rows of strings as an aligned text table; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, type=Path, help="folder with a saved (SmolLM2) tokenizer")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_train"))
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default 8; 2 with --tiny)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="per-step batch (= global batch)")
    ap.add_argument("--workers", type=int, default=2, help="dataloader workers")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="CPU-size smoke test (hidden 64, 2 layers, 32 px)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--keep", action="store_true", help="keep the runs' weight files")
    ap.add_argument("--end-checkpoint", action="store_true",
                    help="let HF write its checkpoint at the last step (full finetuning: weights + optimizer state, tens of GB)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    work = args.work
    out_json = args.out_json or (Path(os.environ["OUT"]) / "gpu_train.json" if os.environ.get("OUT") else work / "gpu_train.json")

    from kit.core.precision import compute_dtype

    env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **{k: version(k) for k in ("transformers", "peft", "bitsandbytes", "accelerate")},
        "compute_dtype_auto": str(compute_dtype("auto")),
        "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "argv": sys.argv[1:],
    }
    say(f"torch {env['torch']} (cuda {env['cuda']}), GPU: {env['gpu']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, accelerate {env['accelerate']}; "
        f"compute_dtype('auto') = {env['compute_dtype_auto']}")
    report: dict = {"env": env, "timings": {}, "info": {}, "modes": [], "tokens_per_sample": None}
    timings, info = report["timings"], report["info"]
    t_all = time.perf_counter()

    for sub in ("parts", "base", "data", *(f"run-{m}" for m in MODES)):
        shutil.rmtree(work / sub, ignore_errors=True)
    for stale in work.glob(".base.*"):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        base = build_parts(args, work, timings, info)
        timings["build_total_s"] = time.perf_counter() - t
        shutil.rmtree(work / "parts", ignore_errors=True)  # base holds everything; free the disk
        from kit.ingest.shapes import write_shapes_dataset

        t = time.perf_counter()
        data = Path(write_shapes_dataset(work / "data", args.samples, seed=0, size=shapes_for(args)[2])["instruct"])
        timings["data_s"] = time.perf_counter() - t
        tokens = tokens_per_sample(base, data, recipe_for(modes[0] if modes else "lora", args))
        report["tokens_per_sample"] = tokens
        say(f"data: {args.samples} samples in {timings['data_s']:.1f}s; tokens/sample mean {tokens['mean']:.0f} "
            f"(min {tokens['min']}, max {tokens['max']}, {tokens['image_tokens']} image tokens)")
    except Exception as e:  # noqa: BLE001 - report whatever broke, in the JSON
        report["error"] = f"setup failed: {type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-4000:]
        write_json(out_json, report)
        say(report["traceback"])
        say(f"SETUP FAILED; wrote {out_json}")
        return 1
    write_json(out_json, report)

    for mode in modes:
        say(f"== {mode}")
        r = run_mode(mode, args, base, data, work, info, tokens)
        report["modes"].append(r)
        say(f"== {mode}: {r['status']} in {r['wall_s']:.1f}s (setup {fmt(r.get('setup_s'), '.1f')}s, loop "
            f"{fmt(r.get('loop_s'), '.1f')}s, save {fmt(r.get('final_save_s'), '.1f')}s), {fmt(r.get('s_per_step'), '.3f')} s/step, "
            f"peak {fmt(r.get('peak_alloc_GiB'), '.2f')} GiB")
        write_json(out_json, report)

    timings["total_s"] = time.perf_counter() - t_all
    write_json(out_json, report)
    say("")
    say(table(report["modes"], info))
    say(f"total {timings['total_s']:.1f}s; results: {out_json}")
    return 0 if all(r["status"] == "ok" for r in report["modes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
