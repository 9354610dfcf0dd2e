"""`kit merge A B ...`: combine several LoRA adapters of one base, exactly, in ΔW space.

Each adapter's update of a target module is ΔW_i = scaling_i · B_i A_i, with PEFT's own scaling
(alpha/r, alpha/√r for rslora, rank/alpha patterns) read from the loaded adapter. Methods:

- linear: Σ w_i ΔW_i, exactly (kept in factored form [w_i B_i] @ [A_i], rank Σ r_i). PEFT's
  add_weighted_adapter 'linear' is not this: it mixes A and B separately (cross terms).
- ties: TIES on the ΔW_i (trim to `density` by magnitude, elect sign, disjoint mean).
- dare: DARE on the ΔW_i (random drop to `density`, rescale, seeded), then the weighted sum.
- svd: the linear sum truncated to rank R.

Weights: LoRA deltas use the weights as given (task arithmetic; a negative weight subtracts a
skill). Full weights saved by the adapters (the projector, via `modules_to_save`) are averaged with
w_i / Σw so that any mix stays a convex mix; an adapter that does not save a module contributes the
base's copy. So Σw must be positive, and weights may be negative only when no adapter saves a
module. Adapters may target different modules: the union is merged, an adapter contributing
ΔW = 0 where it has no LoRA. No method needs equal ranks.

Output: a full model (default) or, with `as_adapter`, one PEFT LoRA adapter of rank R (SVD of each
combined ΔW; relative Frobenius truncation error reported per module) whose card names the common
base, so kit and plain PEFT load it. Verification: the written output, loaded back, against the
base with the same combined ΔW applied unmerged through forward hooks (for linear: the exact
Σ w_i ΔW_i) and the same projector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.merge_utils import dare_linear, ties

from kit.base.folder import AdapterInfo, Base
from kit.base.load import load_base
from kit.core import options
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.precision import dtype_name
from kit.infer.load import processor_for
from kit.merge.adapters import adapter_info, check_out, precision_problems, source_entry
from kit.merge.verify import Reference, logit_drift, logits_of, verification_inputs, write_verified

METHODS = options.MERGE_METHODS


@dataclass
class Delta:
    """One module's combined update: low-rank (B @ A) or a full matrix. [out, in] either way."""

    A: torch.Tensor | None = None  # [k, in]
    B: torch.Tensor | None = None  # [out, k]
    full: torch.Tensor | None = None  # [out, in]

    def dense(self) -> torch.Tensor:
        return self.full if self.full is not None else self.B @ self.A

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.full is not None:
            return torch.nn.functional.linear(x, self.full)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.A), self.B)

    def to(self, dev) -> Delta:
        return Delta(*(t.to(dev) if t is not None else None for t in (self.A, self.B, self.full)))


# ------------------------------------------------------------------------------------ checking


@dataclass(frozen=True)
class CombineOptions:
    """How several adapters are combined and the result verified (the module doc explains each)."""

    method: str = options.MERGE_METHODS[0]
    rank: int | None = None
    as_adapter: bool = False
    density: float = options.MERGE_DENSITY
    seed: int = 0
    base_precision: str = options.MERGE_PRECISIONS[0]
    tolerance: float = options.MERGE_TOLERANCE

    def problems(self) -> list[str]:
        """What is wrong with the options themselves, as --flag messages."""
        out = []
        method, rank = self.method, self.rank
        if method not in METHODS:
            out.append(f"--method {method}: choose one of {', '.join(METHODS)}")
        if rank is None and (method == "svd" or self.as_adapter):
            out.append(f"{'--as-adapter' if self.as_adapter else '--method svd'} needs --rank R (the rank to truncate to)")
        elif rank is not None and rank < 1:
            out.append(f"--rank {rank}: give a rank >= 1")
        elif rank is not None and method != "svd" and not self.as_adapter:
            out.append(f"--rank only applies to --method svd or --as-adapter (method {method} keeps the exact rank)")
        if method in ("ties", "dare") and not 0 < self.density <= 1:
            out.append(f"--density {self.density}: give the fraction of each ΔW to keep, in (0, 1]")
        return out + precision_problems(self.base_precision, self.tolerance)


def check_inputs(infos: list[AdapterInfo], weights: list[float] | None, opts: CombineOptions) -> list[float]:
    """The weights to use (default: equal, summing to 1). Raises one KitError listing every problem."""
    n = len(infos)
    problems = opts.problems()
    w = [1.0 / n] * n if weights is None else list(weights)
    if len(w) != n:
        problems.append(f"--weights has {len(w)} values for {n} adapters; give one weight per adapter")
    elif not all(math.isfinite(x) for x in w):
        problems.append(f"--weights {w}: every weight must be a finite number")
    elif sum(w) <= 0:
        problems.append(f"--weights {w} sum to {sum(w):g}; they must sum to a positive number (e.g. 0.6,0.4)")
    elif any(x < 0 for x in w) and any(i.config.get("modules_to_save") for i in infos):
        problems.append(f"--weights {w}: negative weights cannot mix the projector the adapters save (a convex mix); use weights >= 0")
    first = infos[0]
    for info in infos[1:]:
        if info.fingerprint != first.fingerprint:
            problems.append(
                f"adapter {info.path} was trained on base {info.base.path} (fingerprint {info.fingerprint}) but "
                f"{first.path} on {first.base.path} ({first.fingerprint}); merge only adapters of one base"
            )
    for info in infos:
        cfg, where = info.config, info.path / "adapter_config.json"
        if cfg.get("peft_type") != "LORA":
            problems.append(f"{where}: peft_type {cfg.get('peft_type')}; only LoRA adapters can be merged")
        for key, why in (("use_dora", "DoRA's magnitude vectors are not a ΔW"), ("fan_in_fan_out", "transposed (Conv1D) layers"),
                         ("lora_bias", "LoRA biases"), ("trainable_token_indices", "trainable token rows"),
                         ("target_parameters", "parameter-targeted LoRA")):
            if cfg.get(key):
                problems.append(f"{where}: {key} is set ({why}); kit merges plain LoRA on linear layers only")
    if problems:
        raise KitError("; ".join(problems))
    return w


# ---------------------------------------------------------------------------------- extraction


def extract(model, infos: list[AdapterInfo]):
    """Load every adapter onto `model` with PEFT, read each one's scaled factors and saved modules,
    and give the model back unchanged.

    Returns (model, factors {module: [(adapter index, A [r, in], s·B [out, r])]},
    saved {module: [state dict or None per adapter]}, originals {module: base state dict}).
    """
    names = [f"a{i}" for i in range(len(infos))]
    pm = PeftModel.from_pretrained(model, str(infos[0].path), adapter_name=names[0])
    for name, info in zip(names[1:], infos[1:]):
        pm.load_adapter(str(info.path), adapter_name=name)
    factors: dict[str, list] = {}
    saved: dict[str, list] = {}
    originals: dict[str, dict] = {}

    def state(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    for mname, module in pm.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, LoraLinear):
                raise KitError(f"LoRA on {mname} ({type(module.get_base_layer()).__name__}): kit merges LoRA on linear layers only")
            for i, key in enumerate(names):
                if key in module.lora_A:
                    a = module.lora_A[key].weight.detach().float().cpu().clone()
                    b = module.lora_B[key].weight.detach().float().cpu() * module.scaling[key]
                    factors.setdefault(mname, []).append((i, a, b))
        elif isinstance(module, ModulesToSaveWrapper):
            originals[mname] = state(module.original_module)
            saved[mname] = [state(module.modules_to_save[k]) if k in module.modules_to_save else None for k in names]
    # unload() keeps the active adapter's saved copies in place of the originals: put the base's back.
    model = pm.unload()
    restore(model, originals)
    return model, factors, saved, originals


def restore(model, states: dict[str, dict[str, torch.Tensor]]) -> None:
    for mname, sd in states.items():
        module = model.get_submodule(mname)
        ref = next(module.parameters())
        module.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in sd.items()})


# --------------------------------------------------------------------------------- combination


def combine(entries: list, weights: list[float], method: str, density: float) -> Delta:
    """One module's Σ-style combination of its adapters' (index, A, s·B) factors."""
    if method in ("linear", "svd"):
        # Σ w_i B_i A_i == [w_1 B_1 | w_2 B_2 | ...] @ [A_1; A_2; ...]: exact, and stays low-rank.
        return Delta(A=torch.cat([a for _, a, _ in entries]), B=torch.cat([weights[i] * b for i, _, b in entries], dim=1))
    out_f, in_f = entries[0][2].shape[0], entries[0][1].shape[1]
    per_adapter = [torch.zeros(out_f, in_f) for _ in weights]
    for i, a, b in entries:
        per_adapter[i] = b @ a
    w = torch.tensor(weights, dtype=torch.float32)
    if method == "ties":
        return Delta(full=ties(per_adapter, w, density))
    return Delta(full=dare_linear(per_adapter, w, density))


def truncate(delta: Delta, rank: int) -> tuple[Delta, float]:
    """Best rank-`rank` approximation (zero-padded to exactly `rank`) and its relative Frobenius error."""
    if delta.full is not None:
        u, s, vh = torch.linalg.svd(delta.full, full_matrices=False)
    else:
        # SVD of B @ A through QR of the thin factors: never forms the [out, in] matrix.
        qb, rb = torch.linalg.qr(delta.B)
        qa, ra = torch.linalg.qr(delta.A.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        u, vh = qb @ u, vh @ qa.T
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(u.shape[0], rank)
    a = torch.zeros(rank, vh.shape[1])
    b[:, :k] = u[:, :k] * root  # [out, R]
    a[:k] = root[:, None] * vh[:k]  # [R, in]
    exact = delta.dense()
    norm = exact.norm()
    err = float((exact - b @ a).norm() / norm) if norm > 0 else 0.0
    return Delta(A=a, B=b), err


def combine_saved(saved: dict[str, list], originals: dict[str, dict], weights: list[float]) -> dict[str, dict]:
    """Saved full modules (the projector): Σ (w_i / Σw) · copy_i, the base's copy where an adapter has none."""
    total = sum(weights)
    out = {}
    for mname, copies in saved.items():
        out[mname] = {k: sum((w / total) * (c or originals[mname])[k] for w, c in zip(weights, copies)) for k in originals[mname]}
    return out


def relative_deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    norm = want.norm()
    return float((got - want).norm() / norm) if norm > 0 else float((got - want).norm())


# ----------------------------------------------------------------------------------- the merge


def hooked(model, targets: dict[str, Delta]):
    """Forward hooks adding x @ ΔWᵀ to each target module's output: the combination, unmerged."""
    handles = []
    for mname, d in targets.items():
        def hook(module, args, output, d=d):
            return output + d.apply(args[0]).to(output.dtype)

        handles.append(model.get_submodule(mname).register_forward_hook(hook))
    return handles


def merge_adapters(adapters: list[Path], out: Path, weights: list[float] | None = None, *, options: CombineOptions | None = None,
                   force: bool = False, echo=print, **fields: Any) -> Path:
    """Combine adapters of one base as `options` (or CombineOptions made from `fields`) say; write a
    full model (or with `as_adapter` a rank-`rank` PEFT adapter) plus processor and card at `out`.
    Returns `out`.

    Raises KitError (nothing written) for missing or non-adapter folders, adapters of different bases,
    bad weights / rank / method / density, non-LoRA adapters, an `out` that exists (without `force`)
    or an output whose logits drift past `tolerance` from the unmerged combination.
    """
    if options is not None and fields:
        raise TypeError(f"merge_adapters: give options or its fields, not both ({', '.join(fields)})")
    opts = options or CombineOptions(**fields)
    infos = [adapter_info(Path(a)) for a in adapters]
    w = check_inputs(infos, weights, opts)
    method, rank, as_adapter = opts.method, opts.rank, opts.as_adapter
    base = infos[0].base
    check_out(out, force, [i.path for i in infos] + [base.path])
    notes = []
    quants = {i.quantization for i in infos}
    form = "dequantized" if opts.base_precision == "dequantized" and "nf4" in quants else "full"
    if len(quants) > 1:
        notes.append(f"adapters were trained on differently quantized bases ({', '.join(sorted(quants))}); merging into {form} weights")
    dtypes = {i.dtype for i in infos}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    processor = processor_for(infos[0].path, base)
    inputs, samples = verification_inputs(processor, infos[0].card, base)

    model, factors, saved, originals = extract(load_base(base, dtype, form), infos)
    target_sets = [{m for m, es in factors.items() if any(i == j for i, _, _ in es)} for j in range(len(infos))]
    if len({frozenset(s) for s in target_sets}) > 1:
        notes.append(f"the adapters target different modules: the union ({len(factors)}) is merged, each adapter adding nothing where it has no LoRA")
    for note in notes:
        echo(f"note: {note}")
    combination = Combination.of(factors, saved, originals, weights=w, method=method, rank=rank, density=opts.density, seed=opts.seed)
    ref_logits, effect = combined_reference(model, inputs, combination.projector, targets=combination.targets)
    echo(f"merging {combination.describe(len(infos))} of base {base.path} into {'one LoRA adapter' if as_adapter else f'{form} weights'}")
    for line in combination.quality_lines():
        echo(line)
    pending = [model]
    del model

    def save(folder: Path) -> torch.Tensor:
        return combination.write(pending.pop(), folder, as_adapter=as_adapter, base=base, dtype=dtype, inputs=inputs)

    merge = combination.record(infos, form=form, dtype=dtype)
    reference = Reference(ref_logits, combination.reference_name(), samples, effect=effect,
                          effect_key="combination_effect_max_abs_logit", effect_words="the combination moves logits by up to")
    write_verified(out, save, processor, reference=reference, tolerance=opts.tolerance,
                   card=lambda verification: _card(infos, as_adapter, base, merge=merge, verification=verification, notes=notes),
                   echo=echo)
    return Path(out)


@dataclass
class Combination:
    """Several adapters' updates combined: ΔW per target module, the saved modules' mix (and the
    base's originals of them), and what the method changed against the exact weighted sum."""

    weights: list[float]
    method: str
    rank: int | None
    density: float
    seed: int
    targets: dict[str, Delta]
    projector: dict[str, dict]
    originals: dict[str, dict]
    deviation: dict[str, float]
    truncation: dict[str, float]

    @classmethod
    def of(cls, factors: dict[str, list], saved: dict[str, list], originals: dict[str, dict], weights: list[float], *,
           method: str, rank: int | None, density: float, seed: int) -> Combination:
        targets, deviation, truncation = combine_all(factors, weights, method=method, density=density, rank=rank, seed=seed)
        return cls(weights, method, rank, density, seed, targets, combine_saved(saved, originals, weights), originals,
                   deviation, truncation)

    def describe(self, n: int) -> str:
        rank = f", rank {self.rank}" if self.rank else ""
        return f"{n} adapters ({self.method}, weights {', '.join(f'{x:g}' for x in self.weights)}{rank})"

    def reference_name(self) -> str:
        how = f" (truncated to rank {self.rank})" if self.rank else " (exact Σ w_i ΔW_i)" if self.method == "linear" else ""
        return "the base plus the combined ΔW applied unmerged" + how

    def quality_lines(self) -> list[str]:
        out = []
        if self.truncation:
            out.append(f"rank-{self.rank} truncation: relative Frobenius error max {max(self.truncation.values()):.3g} "
                       f"over {len(self.truncation)} modules")
        if self.deviation:
            out.append(f"{self.method} vs the exact weighted sum: relative Frobenius deviation max {max(self.deviation.values()):.3g}")
        return out

    def write(self, model, folder: Path, *, as_adapter: bool, base: Base, dtype: torch.dtype,
              inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Write the combination into `folder` (one LoRA adapter, or merged into `model`'s weights) and
        return the logits of what was written, loaded back."""
        if as_adapter:
            restore(model, self.originals)
            model = write_adapter(model, self.targets, self.projector, rank=self.rank, base=base.path, folder=folder)
            return logits_of(PeftModel.from_pretrained(model, str(folder)).eval(), inputs)
        with torch.no_grad():
            for mname, d in self.targets.items():
                weight = model.get_submodule(mname).weight
                weight.copy_((weight.float() + d.dense().to(weight.device)).to(weight.dtype))
        model.save_pretrained(folder)
        del model  # one model in memory at a time: the merged one goes before the reload
        return logits_of(load_base(folder, dtype, "full"), inputs)

    def record(self, infos: list[AdapterInfo], *, form: str, dtype: torch.dtype) -> dict[str, Any]:
        """The card's `merge` entry."""
        w = self.weights
        return {
            "method": self.method, "weights": w, "saved_module_weights": [x / sum(w) for x in w], "rank": self.rank,
            "density": self.density if self.method in ("ties", "dare") else None, "seed": self.seed if self.method == "dare" else None,
            "base_precision": form, "dtype": dtype_name(dtype), "target_modules": len(self.targets),
            "saved_modules": sorted(self.projector),
            "adapters": [source_entry(i) for i in infos],
            "truncation": _summary(self.truncation) if self.truncation else None,
            "deviation_from_linear": _summary(self.deviation) if self.deviation else None,
        }


def combine_all(factors: dict[str, list], w: list[float], *, method: str, density: float, rank: int | None,
                seed: int) -> tuple[dict[str, Delta], dict[str, float], dict[str, float]]:
    """(combined ΔW per module, relative deviation of ties/dare from the exact sum, relative rank
    truncation error), module by module in sorted order so dare's seeded draws do not depend on load order."""
    targets: dict[str, Delta] = {}
    deviation: dict[str, float] = {}
    truncation: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mname in sorted(factors):
            d = combine(factors[mname], w, method, density=density)
            if method != "linear":
                exact = combine(factors[mname], w, "linear", density=density).dense()
            if rank is not None:
                d, truncation[mname] = truncate(d, rank)
            if method != "linear":
                deviation[mname] = relative_deviation(d.dense(), exact)
            targets[mname] = d
    return targets, deviation, truncation


def combined_reference(model, inputs: dict[str, torch.Tensor], projector: dict[str, dict],
                       targets: dict[str, Delta]) -> tuple[torch.Tensor, float]:
    """The reference logits (the base with the combined projector and each ΔW applied unmerged by
    forward hooks) and how far that combination moves the base's logits. `model` keeps the
    combined projector."""
    dev = next(model.parameters()).device
    base_logits = logits_of(model, inputs)
    restore(model, projector)
    handles = hooked(model, {m: d.to(dev) for m, d in targets.items()})
    ref_logits = logits_of(model, inputs)
    for h in handles:
        h.remove()
    return ref_logits, logit_drift(ref_logits, base_logits)["max_abs_logit_diff"]


def write_adapter(model, targets: dict[str, Delta], projector: dict[str, dict], rank: int, base: Path, folder: Path):
    """Save the combination as a PEFT LoRA adapter (scaling 1, projector via modules_to_save) and
    return the bare base model (the base's own projector) to load it back onto."""
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(targets),
                     modules_to_save=sorted({m.rsplit(".", 1)[-1] for m in projector}) or None, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for mname, d in targets.items():
            layer = inner.get_submodule(mname)
            layer.lora_A["default"].weight.copy_(d.A)
            layer.lora_B["default"].weight.copy_(d.B)
        for mname, sd in projector.items():
            inner.get_submodule(mname).modules_to_save["default"].load_state_dict(sd)
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(folder)
    originals = {m: {k: v.clone() for k, v in inner.get_submodule(m).original_module.state_dict().items()} for m in projector}
    bare = pm.unload()
    restore(bare, originals)
    return bare


def _summary(per_module: dict[str, float]) -> dict[str, Any]:
    return {"max": max(per_module.values()), "mean": sum(per_module.values()) / len(per_module), "per_module": per_module}


def _card(infos: list[AdapterInfo], as_adapter: bool, base: Base, *, merge: dict, verification: dict, notes: list[str]) -> Card:
    recipe = infos[0].card.recipe
    if recipe is not None:
        # How kit loads the result: an adapter of nf4-trained sources is put on the 4-bit base again.
        quantization = "nf4" if as_adapter and all(i.quantization == "nf4" for i in infos) else "none"
        recipe = recipe.model_copy(update={"quantization": quantization})
    return Card.new("adapter" if as_adapter else "model", made_by="kit merge", base=base.source(),
                    recipe=recipe, merge=merge, verification=verification, notes=notes)
