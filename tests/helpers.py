"""What many tests share: running kit's CLI (in this process or a fresh one), the one set of tiny
training settings, and an adapter made the way kit.train.run saves one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Small, fast, deterministic training on the tiny fixtures; tests change what they need with tiny(**).
TINY = {
    "train.batch_size": 4, "train.global_batch_size": 4, "train.precision": "fp32", "train.gradient_checkpointing": "false",
    "train.num_workers": 0, "train.logging_steps": 1, "train.save_steps": 1000, "data.max_length": 256, "train.warmup_ratio": 0,
}
TINY_LORA = {"quantization": "none", "lora.r": 4, "lora.alpha": 8}


def tiny(lora: bool = False, **changes) -> list[str]:
    """TINY (and TINY_LORA) with `changes` as `--set` values: tiny(train__lr="1e-2") sets train.lr."""
    settings = {**TINY, **(TINY_LORA if lora else {}), **{k.replace("__", "."): v for k, v in changes.items()}}
    return [f"{k}={v}" for k, v in settings.items() if v is not None]


def as_flags(settings: list[str]) -> list[str]:
    return [part for s in settings for part in ("--set", s)]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """kit's CLI in this process: (exit code, stdout, stderr)."""
    from kit.cli.main import main

    old = sys.argv
    sys.argv = ["kit", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    if capsys is None:
        return code, "", ""
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run_cli_captured(*args: str) -> tuple[int, str, str]:
    """run_cli for fixtures wider than one test (no capsys there): stdout and stderr caught here."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, _, _ = run_cli(None, *args)
    return code, out.getvalue(), err.getvalue()


def free_port() -> int:
    """A loopback port nothing listens on now (for launchers that need one named)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kit_env(kit_cache: Path, extra_path: list[Path] = ()) -> dict[str, str]:
    """The environment for kit in child processes (launchers, torchrun): offline, one thread, no GPU,
    this checkout (and `extra_path`) importable, and no launcher settings inherited from outside."""
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", KIT_CACHE=str(kit_cache), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), *map(str, extra_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for k in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_")) or k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")]:
        del env[k]
    return env


def kit_process(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> tuple[int, str, str]:
    """kit in a fresh process (for what this one cannot capture or must not share)."""
    r = subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=cwd or REPO, env=env)
    return r.returncode, r.stdout, r.stderr


def make_adapter(base: Path, out: Path, *, seed: int, r: int = 4, alpha: int = 8, targets="all-linear",
                 quantization: str = "none", rslora: bool = False, template: str | None = None) -> Path:
    """A LoRA adapter on `base` as kit.train.run saves one: LoRA on the LLM's linear layers
    (`targets`: leaf names or all-linear), the projector in modules_to_save, the processor, and a
    kit.json card naming the base and the recipe. init_lora_weights=False and a nudged projector
    make it answer unlike the base and unlike other seeds."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kit.base.load import load_model, load_processor
    from kit.core import cards
    from kit.core.recipes import load_recipe
    from kit.train.model import lora_target_regex

    torch.manual_seed(seed)
    model = load_model(base, dtype=torch.float32, nf4=quantization == "nf4")
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_target_regex(model, targets), init_lora_weights=False,
                     use_rslora=rslora, modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(out)
    load_processor(base).save_pretrained(out)
    recipe = load_recipe("llava15-lora", [f"name=test-{seed}", f"quantization={quantization}", "train.precision=fp32", f"lora.r={r}",
                                          f"lora.alpha={alpha}", *([f"data.template={template}"] if template else [])])
    cards.Card.new("adapter", made_by="tests", recipe=recipe, base=cards.describe_source(base)).write(out)
    return out
