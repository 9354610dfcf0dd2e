"""adapt throughput: kit's QLoRA training vs TRL SFTTrainer's standard VLM recipe, side by side.

Same base model (kit's LLaVA-1.5-shaped build with random weights, loaded 4-bit the same way), same
LLaVA JSON data, same per-device batch, steps, learning rate, LoRA config and hardware, in one
process. Per system: s/step, effective (non-pad) tokens/s, pad fraction (pad tokens / all tokens of
the batches the model saw), peak GPU memory; then kit/TRL and the targets (>= 1.3x, kit pad <= 5%).

    PYTHONPATH=/tmp/site python3 benchmarks/adapt_throughput.py --tokenizer .whl/tok        # one GPU, ~3 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adapt_throughput.py --tokenizer DIR --tiny  # CPU smoke

The data: procedurally drawn shapes (kit.ingest.shapes) with a LLaVA-mix-like length spread: ~15%
text-only, image samples with short VQA-style, multi-turn and long detailed answers; ~140 to ~1800
tokens per sample at full size (576 image tokens included; mean ~830). Both systems use the recipe's batch
shape (micro-batch 4, 8 accumulated = 32 per optimizer step) and run one epoch by default, so they see
exactly the same samples; the first --warmup micro-batches of each are left out of the rates.

Tokens are counted where both systems meet the model: a forward pre-hook on the LlavaModel (the
backbone under the LM head, called once per micro-batch by both) reads input_ids and attention_mask.

kit: `kit.train.train` with the llava15-qlora recipe (steps and save_steps overridden; --tiny: no
quantization, bitsandbytes on CPU is slow, and no dataloader workers).
TRL: `SFTTrainer(model, args=SFTConfig(...), train_dataset=<messages + images>, processing_class=processor,
peft_config=<kit's LoraConfig>)`, TRL's documented VLM recipe; every non-default is in TRL_NON_DEFAULTS.

Writes JSON to --out-json (default $OUT/adapt_throughput.json, else WORK/adapt_throughput.json).
Exits 1 if either system failed (and, with --check-targets, if a target is missed).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from gpu_train import build_parts, fmt, free_memory, render, say, sync, version, write_json
from transformers import TrainerCallback

TARGET_RATIO = 1.3
TARGET_PAD = 0.05
SYSTEMS = ("kit", "trl")

# What the TRL run sets beyond SFTConfig's defaults, and why. Everything else is TRL's default:
# no packing / padding-free (refused for vision datasets anyway), pad to the longest in the batch,
# random sampling (train_sampling_strategy "random"), gradient checkpointing on, bf16 on a GPU,
# dataloader_num_workers 0, loss on the whole sequence (assistant_only_loss=False), TRL's fused
# chunked LM-head loss, logging every 10 steps, linear schedule, no warmup, seed 42 (kit's too).
TRL_NON_DEFAULTS = {
    "output_dir": "a scratch folder",
    "per_device_train_batch_size": "same per-device micro-batch as kit (the recipe's train.batch_size, 4)",
    "gradient_accumulation_steps": "same samples per optimizer step as kit (the recipe's global_batch_size 32 / batch 4 = 8)",
    "max_steps": "same number of optimizer steps as kit (default: one epoch, so both see every sample once)",
    "learning_rate": "kit's recipe lr (llava15-qlora: 2e-4); TRL's default 2e-5 is a full-finetuning rate",
    "max_length": "None, as TRL's docs prescribe for VLMs: the default 1024 truncates image tokens ('Mismatch in image token count')",
    "save_strategy": "'no': checkpoints are not part of the measurement (kit's save_steps is set past the run as well)",
    "bf16": "only where kit's precision is not bf16 (CPU, auto = fp32): False, to match; on a GPU TRL's default, True, is what kit uses",
    "use_cpu": "only without a GPU: True, as kit sets it (transformers refuses bf16 on a CPU otherwise)",
    "peft_config": "kit's own LoraConfig for the recipe (r, alpha, dropout, all linear layers of the LLM, projector in modules_to_save)",
    "model": "loaded by kit.base.load.load_model with kit's BitsAndBytesConfig (nf4 + double quant, tower/projector/lm_head unquantized): the same 4-bit model kit trains",
}


# ------------------------------------------------------------------------------------------ data

_FILLER = (
    "The background is a plain light grey with a faint, even noise.",
    "Its edges are sharp and the colour is uniform across the whole surface.",
    "Nothing else appears in the picture, so the object is easy to single out.",
    "The object takes up roughly a third of the width of the frame.",
    "There are no shadows, reflections or textures that would suggest a real scene.",
    "Because the image is synthetic, the outline is exact and free of blur.",
    "The contrast between the object and the background is strong.",
    "A viewer would describe the composition as simple and balanced.",
    "The empty space around the object makes its position easy to judge.",
    "Such drawings are often used to test whether a model can name colours and shapes.",
    "If the image were cropped, the object would still be clearly visible.",
    "The lighting is flat, which means the colour looks the same everywhere.",
    "There is no text, logo or watermark anywhere in the image.",
    "The scene could serve as an icon or as an example in a geometry lesson.",
    "Counting objects here is trivial: there is exactly one.",
    "The grey tone of the background does not compete with the saturated colour.",
)
_TEXT_TOPICS = (
    ("What is the difference between a square and a rectangle?",
     "A square has four equal sides and four right angles, while a rectangle only needs four right angles."),
    ("Why do stars in drawings usually have five points?",
     "Five points make a shape that is easy to draw in one stroke and reads well at small sizes."),
    ("How would you describe the colour purple to someone?",
     "Purple sits between red and blue; it can feel calm like blue or warm like red depending on the mix."),
    ("Explain what a triangle is.",
     "A triangle is a polygon with three sides and three corners whose angles add up to 180 degrees."),
    ("Give some tips for drawing a perfect circle by hand.",
     "Anchor your wrist, move the whole arm, and draw several light passes before committing to a line."),
    ("Which colours go well together on a poster?",
     "Complementary pairs such as blue and orange, or yellow and purple, give strong contrast."),
)
_IMAGE_QUESTIONS = (
    "Describe the image in detail.",
    "Explain what is shown in this picture and how it is composed.",
    "What can you tell me about this image?",
    "Write a thorough description of the scene.",
    "Analyse the image: what stands out, and why?",
)


def _fill(rng: random.Random, first: str, target_tokens: int, ntok) -> str:
    """`first` plus filler sentences until about `target_tokens` tokens."""
    out, n = [first], ntok(first)
    while n < target_tokens:
        s = rng.choice(_FILLER)
        out.append(s)
        n += ntok(" " + s)
    return " ".join(out)


def _loguniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def write_llava_mix(out_dir: Path, n: int, seed: int, size: int, tokenizer, image_tokens: int, max_length: int,
                    text_scale: float = 1.0, text_only_frac: float = 0.15) -> Path:
    """A LLaVA JSON file (plus images/) with LLaVA-mix-like length variety; every sample fits max_length."""
    from kit.ingest.shapes import caption, draw_scene, qa_rounds

    cache: dict[str, int] = {}

    def ntok(s: str) -> int:
        if s not in cache:
            cache[s] = len(tokenizer(s, add_special_tokens=False)["input_ids"])
        return cache[s]

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    # Text budget per sample: what is left after the image tokens, less room for the template (~8 per turn).
    budget = int((max_length - image_tokens) * 0.85)
    # Exactly round(n * text_only_frac) text-only samples (at least one), at random places.
    text_only = set(random.Random(f"adapt_throughput:{seed}").sample(range(n), min(n, max(1, round(n * text_only_frac)))))
    records = []
    for i in range(n):
        rng = random.Random(f"adapt_throughput:{seed}:{i}")
        sid = f"mix_{i:05d}"
        if i in text_only:
            total = min(budget, int(_loguniform(rng, 80, 1500) * text_scale) + 8)
            turns = rng.randint(1, 4)
            conv = []
            for _ in range(turns):
                q, a = rng.choice(_TEXT_TOPICS)
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _fill(rng, a, total // turns, ntok)}]
            records.append({"id": sid, "conversations": conv})
            continue
        img, attrs = draw_scene(rng, size)
        rel = f"images/{sid}.png"
        img.save(out_dir / rel)
        kind = rng.random()
        conv = []
        if kind < 0.5:  # short VQA-style rounds
            rounds = qa_rounds(attrs, rng) * rng.randint(1, 2)
            for q, a in rounds:
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        elif kind < 0.8:  # multi-turn conversation, medium answers
            turns = rng.randint(3, 8)
            for t in range(turns):
                q, a = rng.choice(qa_rounds(attrs, rng))
                conv += [{"from": "human", "value": q},
                          {"from": "gpt", "value": _fill(rng, a, int(rng.uniform(15, 110) * text_scale), ntok)}]
        else:  # detailed description / complex reasoning: long answers
            turns = rng.randint(1, 2)
            for t in range(turns):
                q = rng.choice(_IMAGE_QUESTIONS)
                conv += [{"from": "human", "value": q},
                          {"from": "gpt", "value": _fill(rng, caption(attrs, rng), int(rng.uniform(150, 620) * text_scale), ntok)}]
        # Keep inside the budget: drop whole rounds from the end.
        while len(conv) > 2 and sum(ntok(c["value"]) + 8 for c in conv) > budget:
            conv = conv[:-2]
        conv[0]["value"] = "<image>\n" + conv[0]["value"]
        records.append({"id": sid, "image": rel, "conversations": conv})
    path = out_dir / "mix.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def to_trl_rows(data: Path) -> list[dict]:
    """LLaVA JSON -> TRL's conversational vision format: {"messages": [...], "images": [path] or []}.

    The `<image>` placeholder is dropped from the text: TRL (prepare_multimodal_messages) inserts one
    image block before the first user message's text, which kit's chat template renders as `<image>\\n`,
    exactly where the LLaVA sample had it."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    rows = []
    for rec in json.loads(Path(data).read_text()):
        msgs = []
        for turn in rec["conversations"]:
            text = turn["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
            msgs.append({"role": roles[turn["from"]], "content": text})
        images = [str((Path(data).parent / rec["image"]).resolve())] if rec.get("image") else []
        rows.append({"messages": msgs, "images": images})
    return rows


def trl_dataset(rows: list[dict]):
    from datasets import Dataset, Features, Image, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List
    features = Features({"messages": List({"role": Value("string"), "content": Value("string")}), "images": List(Image())})
    return Dataset.from_list(rows, features=features)


def length_stats(lengths: list[int]) -> dict:
    s = sorted(lengths)
    return {"samples": len(s), "mean": sum(s) / len(s), "min": s[0], "p50": s[len(s) // 2],
            "p90": s[int(0.9 * (len(s) - 1))], "max": s[-1]}


# ------------------------------------------------------------------------------------------ meter


def llava_core(model):
    """The LlavaModel (vision_tower + projector + language_model, no lm_head) inside a PEFT/Trainer model."""
    for m in model.modules():
        if all(hasattr(m, a) for a in ("vision_tower", "multi_modal_projector", "language_model")) and not hasattr(m, "lm_head"):
            return m
    raise RuntimeError(f"no LlavaModel inside {type(model).__name__}")


class Meter(TrainerCallback):
    """Wall time of every micro-batch (data loading included; the optimizer step counts in the last
    micro-batch of each step) and the tokens the model actually saw in it."""

    def __init__(self):
        self.begin = self.end = None
        self.micro: list[dict] = []
        self.model_info: dict = {}
        self._handle = None
        self._reset()

    def _reset(self):
        self._total = 0
        self._nonpad = []
        self._rows = 0
        self._images = 0
        self._longest = 0

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self._total += ids.numel()
        self._rows += ids.shape[0]
        self._longest = max(self._longest, ids.shape[1])
        self._nonpad.append(mask.sum() if mask is not None else torch.tensor(ids.numel()))
        pv = kwargs.get("pixel_values")
        if pv is not None:
            self._images += pv.shape[0]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from kit.base.family import family_of_model

        part_of = family_of_model(model).part_of
        self._handle = llava_core(model).register_forward_pre_hook(self._hook, with_kwargs=True)
        four_bit: dict[str, int] = {}
        for name, m in model.named_modules():
            # bitsandbytes' own class only: PEFT's LoRA wrapper around it is also named Linear4bit.
            if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"):
                key = part_of(name) or "other"
                four_bit[key] = four_bit.get(key, 0) + 1
        trainable: dict[str, int] = {}
        for p in model.parameters():
            if p.requires_grad:
                trainable[str(p.dtype).removeprefix("torch.")] = trainable.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
        self.model_info = {"linear4bit": four_bit, "trainable_by_dtype": trainable,
                           "trainable_M": sum(trainable.values()) / 1e6,
                           "total_M": sum(p.numel() for p in model.parameters()) / 1e6,
                           "trainer_bf16": bool(args.bf16), "grad_accum": args.gradient_accumulation_steps,
                           "gradient_checkpointing": bool(getattr(model, "is_activation_checkpointing", False)
                                                          or getattr(args, "gradient_checkpointing", False)
                                                          or getattr(args, "activation_checkpointing", False)),
                           "device": str(next(model.parameters()).device)}
        sync()
        self.begin = time.perf_counter()
        self._last = self.begin

    def _mark(self, step_end: bool) -> None:
        sync()
        now = time.perf_counter()
        self.micro.append({"s": now - self._last, "tokens": self._total, "nonpad": int(sum(int(x) for x in self._nonpad)),
                           "rows": self._rows, "images": self._images, "longest": self._longest, "step_end": step_end})
        self._last = now
        self._reset()

    def on_substep_end(self, args, state, control, **kwargs):
        self._mark(False)

    def on_step_end(self, args, state, control, **kwargs):
        self._mark(True)
        if state.global_step >= state.max_steps:
            control.should_save = False  # HF saves at max_steps whatever save_steps says
        return control

    def on_train_end(self, args, state, control, **kwargs):
        sync()
        self.end = time.perf_counter()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def summarize(meter: Meter, warmup: int, accum: int) -> dict:
    """Rates over the micro-batches after the first `warmup` ones."""
    mb = meter.micro
    timed = mb[warmup:] if len(mb) > warmup else mb
    res: dict = {"steps_done": sum(m["step_end"] for m in mb), "micro_batches": len(mb),
                 "warmup_micro_batches_excluded": len(mb) - len(timed),
                 "micro_batch_times_s": [round(m["s"], 4) for m in mb],
                 "tokens_per_micro_batch": [m["tokens"] for m in mb], "nonpad_per_micro_batch": [m["nonpad"] for m in mb]}
    if not timed:
        return res
    t = sum(m["s"] for m in timed)
    tot = sum(m["tokens"] for m in timed)
    nonpad = sum(m["nonpad"] for m in timed)
    all_tot = sum(m["tokens"] for m in mb)
    all_nonpad = sum(m["nonpad"] for m in mb)
    res.update({
        "s_per_micro_batch": t / len(timed),
        "s_per_step": t / len(timed) * accum,  # an optimizer step = `accum` micro-batches
        "tokens_per_s": nonpad / t if t > 0 else None,  # effective (non-pad) tokens per second
        "padded_tokens_per_s": tot / t if t > 0 else None,
        "pad_fraction": 1 - nonpad / tot if tot else None,  # over the timed micro-batches
        "pad_fraction_all": 1 - all_nonpad / all_tot if all_tot else None,
        "nonpad_tokens_all": all_nonpad,
        "tokens_all": all_tot,
        "samples_seen": sum(m["rows"] for m in mb),
        "images_seen": sum(m["images"] for m in mb),
        "loop_s": (meter.end - meter.begin) if meter.end and meter.begin else None,
    })
    res.update(meter.model_info)
    return res


# ------------------------------------------------------------------------------------------ systems


def kit_recipe(args):
    from kit.core.recipes import load_recipe

    over = [f"train.batch_size={args.batch}", f"train.global_batch_size={args.global_batch}", f"train.max_steps={args.steps}",
            "train.save_steps=1000000"]
    if args.workers is not None:
        over.append(f"train.num_workers={args.workers}")
    if args.quantization != "nf4":
        over.append(f"quantization={args.quantization}")
    if args.precision:
        over.append(f"train.precision={args.precision}")
    over += args.kit_set
    return load_recipe("llava15-qlora", over), over


def run_kit(args, base: Path, data: Path, work: Path) -> dict:
    from kit.train.run import train

    out = work / "run-kit"
    shutil.rmtree(out, ignore_errors=True)
    recipe, over = kit_recipe(args)
    meter = Meter()
    res = {"system": "kit", "recipe": "llava15-qlora", "overrides": over, "quantization": recipe.quantization,
           "settings": {"batch": recipe.train.batch_size, "grad_accum": args.global_batch // args.batch, "lr": recipe.train.lr,
                        "gradient_checkpointing": recipe.train.gradient_checkpointing,
                        "group_by_modality_length": recipe.data.group_by_modality_length,
                        "dataloader_workers": recipe.train.num_workers, "precision": recipe.train.precision}}
    t0 = time.perf_counter()
    train(recipe, base=str(base), data=str(data), out=str(out), callbacks=[meter], echo=lambda m: say(f"  [kit] {m}"))
    sync()
    res["wall_s"] = time.perf_counter() - t0
    res["setup_s"] = meter.begin - t0 if meter.begin else None
    res.update(summarize(meter, args.warmup, args.global_batch // args.batch))
    return res


def kit_lora_config(model, recipe):
    """Exactly the LoraConfig kit.train.prepare_model builds for this recipe."""
    from peft import LoraConfig

    from kit.train.model import lora_target_regex

    return LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=lora_target_regex(model, recipe.lora.targets),
        modules_to_save=["multi_modal_projector"] if "projector" in recipe.train.trainable else None,
        task_type="CAUSAL_LM",
    )


def run_trl(args, base: Path, rows: list[dict], work: Path) -> dict:
    from trl import SFTConfig, SFTTrainer

    from kit.base.load import load_model, load_processor
    from kit.core.precision import compute_dtype

    out = work / "run-trl"
    shutil.rmtree(out, ignore_errors=True)
    recipe, _ = kit_recipe(args)
    processor = load_processor(base)
    dtype = compute_dtype(recipe.train.precision)
    nf4 = recipe.quantization == "nf4"
    device_map = {"": 0} if nf4 and torch.cuda.is_available() else None
    t0 = time.perf_counter()
    model = load_model(base, dtype=dtype, nf4=nf4, device_map=device_map)
    peft_config = kit_lora_config(model, recipe)
    cfg_kwargs = {"output_dir": str(out), "per_device_train_batch_size": args.batch,
                  "gradient_accumulation_steps": args.global_batch // args.batch, "max_steps": args.steps,
                  "learning_rate": recipe.train.lr, "max_length": None, "save_strategy": "no"}
    if dtype != torch.bfloat16:
        cfg_kwargs["bf16"] = False
    if not torch.cuda.is_available():
        cfg_kwargs["use_cpu"] = True
    config = SFTConfig(**cfg_kwargs)
    meter = Meter()
    trainer = SFTTrainer(model=model, args=config, train_dataset=trl_dataset(rows), processing_class=processor,
                         peft_config=peft_config, callbacks=[meter])
    res = {"system": "trl", "trl": version("trl"), "quantization": recipe.quantization, "sft_config_set": sorted(cfg_kwargs),
           "settings": {"batch": config.per_device_train_batch_size, "grad_accum": config.gradient_accumulation_steps,
                        "lr": config.learning_rate, "gradient_checkpointing": bool(config.gradient_checkpointing),
                        "packing": config.packing, "padding_free": config.padding_free, "max_length": config.max_length,
                        "train_sampling_strategy": getattr(config, "train_sampling_strategy", None),
                        "dataloader_workers": config.dataloader_num_workers, "bf16": bool(config.bf16),
                        "assistant_only_loss": config.assistant_only_loss, "collator": type(trainer.data_collator).__name__}}
    trainer.train()
    sync()
    res["wall_s"] = time.perf_counter() - t0
    res["setup_s"] = meter.begin - t0 if meter.begin else None
    res.update(summarize(meter, args.warmup, config.gradient_accumulation_steps))
    del trainer, model
    return res


def run_system(name: str, fn, *a) -> dict:
    free_memory()
    try:
        res = fn(*a)
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one failing system must not hide the other's numbers
        res = {"system": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
        say(res["traceback"])
        say(f"  [{name}] FAILED: {res['error'][:500]}")
    if torch.cuda.is_available():
        res["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    free_memory()
    # Nothing of this system may stay alive into the next one (its peak memory would count it).
    res["models_alive_after"] = sum(issubclass(type(o), torch.nn.Module) and type(o).__name__.endswith("ForConditionalGeneration")
                                    for o in gc.get_objects())
    return res


# ------------------------------------------------------------------------------------------ report


def table(systems: dict[str, dict]) -> str:
    rows = [("system", "status", "s/step", "non-pad tokens/s", "pad fraction", "peak GPU GiB", "grad ckpt")]
    for name in SYSTEMS:
        r = systems.get(name)
        if r is None:
            continue
        rows.append((name if name == "kit" else "TRL SFTTrainer", r["status"], fmt(r.get("s_per_step"), ".3f"),
                     fmt(r.get("tokens_per_s"), ".0f"), fmt(r.get("pad_fraction"), ".1%"), fmt(r.get("peak_alloc_GiB"), ".2f"),
                     {True: "on", False: "off"}.get(r.get("gradient_checkpointing"), "-")))
    return render(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, type=Path, help="folder with a saved (SmolLM2) tokenizer")
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapt_throughput"))
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU-size check: hidden 64, 2 layers, 32 px, no quantization")
    ap.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default 8; 2 with --tiny)")
    ap.add_argument("--samples", type=int, default=None, help="samples in the data (default 512; 32 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="per-device micro-batch, both systems (default: the recipe's, 4)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="samples per optimizer step, both systems (default: the recipe's, 32; 8 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per system (default: one epoch, samples // global batch)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="first micro-batches of each system left out of the rates (default 8; 1 with --tiny)")
    ap.add_argument("--workers", type=int, default=None,
                    help="kit's dataloader workers (default: the recipe's, 2; 0 with --tiny). TRL keeps its default, 0")
    ap.add_argument("--text-scale", type=float, default=None, help="scale of the text lengths (default 1; 0.15 with --tiny)")
    ap.add_argument("--quantization", choices=("nf4", "none"), default=None,
                    help="both systems (default nf4; none with --tiny: bitsandbytes' CPU fallback is slow)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                    help="kit's train.precision, and TRL's bf16 to match (default: the recipe's, auto)")
    ap.add_argument("--kit-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for kit, e.g. train.gradient_checkpointing=true (repeatable)")
    ap.add_argument("--order", default="kit,trl", help="which system runs first")
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    ap.add_argument("--check-targets", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    from kit.core.recipes import load_recipe

    shipped = load_recipe("llava15-qlora").train
    args.samples = args.samples or (32 if args.tiny else 512)
    args.batch = args.batch or shipped.batch_size
    args.global_batch = args.global_batch or (2 * args.batch if args.tiny else (shipped.global_batch_size or args.batch))
    if args.global_batch % args.batch:
        ap.error(f"--global-batch {args.global_batch} is not a multiple of --batch {args.batch}")
    args.steps = args.steps or max(1, args.samples // args.global_batch)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 8)
    args.quantization = args.quantization or ("none" if args.tiny else "nf4")
    if args.workers is None and args.tiny:
        args.workers = 0
    text_scale = args.text_scale if args.text_scale is not None else (0.15 if args.tiny else 1.0)
    order = [s.strip() for s in args.order.split(",") if s.strip()]
    if sorted(order) != sorted(SYSTEMS):
        ap.error(f"--order must name {', '.join(SYSTEMS)} once each")
    work = args.work
    out_json = args.out_json or (Path(os.environ["OUT"]) / "adapt_throughput.json" if os.environ.get("OUT") else work / "adapt_throughput.json")

    from kit.core.precision import compute_dtype

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           **{k: version(k) for k in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "pyarrow")},
           "compute_dtype_auto": str(compute_dtype("auto")), "argv": sys.argv[1:]}
    quant = "nf4 QLoRA" if args.quantization == "nf4" else "LoRA, quantization none"
    if args.tiny:
        mode = f"tiny (CPU-size model, {quant}" + ("; bitsandbytes' CPU fallback is slow" if args.quantization == "none" else "") + ")"
    else:
        mode = f"LLaVA-1.5 shape: CLIP-L/336 + 7B-width Llama, {args.layers or 8} layers, {quant}"
    say(f"adapt throughput — {mode}")
    say(f"torch {env['torch']} (cuda {env['cuda']}), GPU: {env['gpu']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, datasets {env['datasets']}")
    report: dict = {"env": env, "mode": mode, "tiny": args.tiny, "quantization": args.quantization,
                    "batch": args.batch, "global_batch": args.global_batch, "grad_accum": args.global_batch // args.batch,
                    "steps": args.steps, "warmup_micro_batches_excluded": args.warmup,
                    "order": order, "trl_non_defaults": TRL_NON_DEFAULTS, "timings": {}, "info": {}, "systems": {}}
    if args.tiny:
        report["note"] = (f"tiny CPU run, quantization {args.quantization} for both systems"
                          + (" (bitsandbytes on CPU is slow)" if args.quantization == "none" else "")
                          + "; numbers are a smoke check, not the benchmark")
    t_all = time.perf_counter()
    for sub in ("parts", "base", "data", "run-kit", "run-trl"):
        shutil.rmtree(work / sub, ignore_errors=True)
    for stale in work.glob(".base.*"):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    try:
        if torch.cuda.is_available():  # CUDA/cuBLAS start-up is paid here, by neither system
            a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
            for _ in range(5):
                a @ a
            sync()
            del a
        t = time.perf_counter()
        base = build_parts(args, work, report["timings"], report["info"])
        report["timings"]["build_total_s"] = time.perf_counter() - t
        shutil.rmtree(work / "parts", ignore_errors=True)

        from kit.data.dataset import build_dataset
        from kit.base.folder import Base
        from kit.base.load import load_processor
        from kit.data.processing import Processing

        recipe, _ = kit_recipe(args)
        proc = load_processor(base)
        crop = getattr(proc.image_processor, "crop_size", None) or proc.image_processor.size
        size = crop.get("height") or crop.get("shortest_edge")
        n_img = Processing(proc, "vicuna_v1").image_tokens((size, size))
        t = time.perf_counter()
        data = write_llava_mix(work / "data", args.samples, args.seed, size, proc.tokenizer, n_img,
                               recipe.data.max_length, text_scale=text_scale)
        report["timings"]["data_s"] = time.perf_counter() - t
        _, rep = build_dataset(data, proc, recipe.data.template, recipe.data.max_length,
                               recipe.data.image_aspect or Base.open(base).image_aspect)
        if rep.problems or rep.truncated_text:
            raise RuntimeError(f"generated data does not fit kit's recipe: {rep.summary()}")
        rows = to_trl_rows(data)
        n_text_only = sum(not r["images"] for r in rows)
        report["data"] = {"path": str(data), "samples": len(rows), "text_only": n_text_only,
                          "text_only_fraction": n_text_only / len(rows), "image_tokens": n_img,
                          "kit_tokens_per_sample": length_stats(rep.lengths)}
        say(f"data: {len(rows)} samples ({n_text_only} text-only), kit tokens/sample {length_stats(rep.lengths)} "
            f"({n_img} image tokens); {args.steps} steps x {args.global_batch} samples (micro-batch {args.batch})")
    except Exception as e:  # noqa: BLE001
        report["error"] = f"setup failed: {type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-4000:]
        write_json(out_json, report)
        say(report["traceback"])
        say(f"SETUP FAILED; wrote {out_json}")
        return 1
    write_json(out_json, report)

    runners = {"kit": lambda: run_system("kit", run_kit, args, base, data, work),
               "trl": lambda: run_system("trl", run_trl, args, base, rows, work)}
    for name in order:
        say(f"== {name}")
        r = runners[name]()
        report["systems"][name] = r
        say(f"== {name}: {r['status']} in {fmt(r.get('wall_s'), '.1f')}s (setup {fmt(r.get('setup_s'), '.1f')}s), "
            f"{fmt(r.get('s_per_step'), '.3f')} s/step, {fmt(r.get('tokens_per_s'), '.0f')} non-pad tokens/s, "
            f"pad {fmt(r.get('pad_fraction'), '.1%')}, peak {fmt(r.get('peak_alloc_GiB'), '.2f')} GiB")
        write_json(out_json, report)

    kit_r, trl_r = report["systems"].get("kit", {}), report["systems"].get("trl", {})
    ok = kit_r.get("status") == "ok" and trl_r.get("status") == "ok"
    ratio = kit_r["tokens_per_s"] / trl_r["tokens_per_s"] if ok and kit_r.get("tokens_per_s") and trl_r.get("tokens_per_s") else None
    report["ratio_kit_over_trl"] = ratio
    if ok:
        report["same_tokens_seen"] = kit_r.get("nonpad_tokens_all") == trl_r.get("nonpad_tokens_all")
    report["targets"] = {
        "ratio": {"target": f">= {TARGET_RATIO}x", "value": ratio, "met": ratio is not None and ratio >= TARGET_RATIO},
        "kit_pad_fraction": {"target": f"<= {TARGET_PAD:.0%}", "value": kit_r.get("pad_fraction"),
                             "met": kit_r.get("pad_fraction") is not None and kit_r["pad_fraction"] <= TARGET_PAD},
    }
    report["timings"]["total_s"] = time.perf_counter() - t_all
    write_json(out_json, report)

    yes = lambda b: "yes" if b else "NO"
    say("")
    say(f"adapt throughput — {mode}; {env['gpu'] or 'CPU'}; {args.steps} steps x {args.global_batch} samples "
        f"(micro-batch {args.batch}; first {args.warmup} micro-batches not timed), {len(rows)} samples")
    say(table(report["systems"]))
    say(f"kit / TRL non-pad tokens/s: {fmt(ratio, '.2f')}x  (target >= {TARGET_RATIO}x: {yes(report['targets']['ratio']['met'])})")
    say(f"kit pad fraction: {fmt(kit_r.get('pad_fraction'), '.1%')}  (target <= {TARGET_PAD:.0%}: "
        f"{yes(report['targets']['kit_pad_fraction']['met'])}); TRL pad fraction: {fmt(trl_r.get('pad_fraction'), '.1%')}")
    if ok and not report.get("same_tokens_seen"):
        say(f"note: the systems saw different non-pad token totals ({kit_r.get('nonpad_tokens_all')} vs "
            f"{trl_r.get('nonpad_tokens_all')}): --steps is not one epoch, or their tokenization differs")
    if args.tiny:
        say(f"note: {report['note']}")
    say(f"total {report['timings']['total_s']:.1f}s; results: {out_json}")
    if not ok:
        return 1
    if args.check_targets and not all(t["met"] for t in report["targets"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
