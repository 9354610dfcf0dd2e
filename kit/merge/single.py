"""`kit merge`: fold a LoRA adapter into its base and write a standalone HF-native model.

A QLoRA adapter learned against dequant(nf4(W)), not W. The faithful merge (the default,
`base_precision="dequantized"`) loads the base 4-bit exactly as training did, dequantizes it and
merges into that; `"full"` merges into the original weights and drifts.

Every merge is verified before it becomes visible: the written folder is loaded back and its
logits on a few samples are compared with the unmerged reference (the adapter on the base as it was
trained: for nf4, the 4-bit base). Max |Δlogit| and argmax (greedy next-token) agreement go into the
card; past `tolerance` the merge fails and nothing is left at `out`. Outputs are written into a
temp folder beside `out` and renamed into place at the end.

Several adapters: kit.merge.multi.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel

from kit.base.load import load_base
from kit.core import options
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.precision import dtype_name
from kit.infer.load import processor_for
from kit.merge.adapters import AdapterInfo, adapter_info, check_out, precision_problems, source_entry
from kit.merge.verify import DEFAULT_TOLERANCE, Reference, logit_drift, logits_of, verification_inputs, write_verified


@dataclass
class Merged:
    """A verified merge at `path`: the model as loaded back from it (for callers that go on with
    it, as kit export does), its processor and card."""

    path: Path
    model: Any
    processor: Any
    card: Card


def merge(adapter: Path, out: Path, base_precision: str = options.MERGE_PRECISIONS[0], tolerance: float = DEFAULT_TOLERANCE,
          force: bool = False, echo=print) -> Path:
    """Merge one adapter into its base; write model + processor + card at `out`. Returns `out`.

    Raises KitError for a folder that is not an adapter, a missing or changed base, an `out` that
    exists (without `force`), or a merge whose logits drift past `tolerance` from the adapter model.
    """
    check_options(base_precision, tolerance)
    info = adapter_info(Path(adapter))
    check_out(out, force, [info.path, info.base.path])
    return merge_adapter(info, out, base_precision=base_precision, tolerance=tolerance, echo=echo).path


def check_options(base_precision: str, tolerance: float) -> None:
    problems = precision_problems(base_precision, tolerance)
    if problems:
        raise KitError("; ".join(problems))


def merge_adapter(info: AdapterInfo, out: Path, *, base_precision: str = options.MERGE_PRECISIONS[0],
                  tolerance: float = DEFAULT_TOLERANCE, echo=print) -> Merged:
    """merge() for an adapter already opened, `out` already checked."""
    check_options(base_precision, tolerance)
    base, dtype, quantized = info.base, info.dtype, info.quantization == "nf4"
    notes = []
    if not quantized and base_precision == "dequantized":
        notes.append("the adapter was not trained on a quantized base: dequantized and full are the same merge")
    precision = base_precision if quantized else "full"
    processor = processor_for(info.path, base)
    inputs, samples = verification_inputs(processor, info.card, base)

    # The reference is the model as trained: the adapter unmerged on the base it saw (4-bit for QLoRA).
    reference = PeftModel.from_pretrained(load_base(base, dtype, "nf4" if quantized else "full"), str(info.path)).eval()
    ref_logits = logits_of(reference, inputs)
    with reference.disable_adapter():
        effect = logit_drift(ref_logits, logits_of(reference, inputs))["max_abs_logit_diff"]
    ref_name = "the adapter on the 4-bit nf4 base it was trained on" if quantized else "the unmerged adapter on its base"
    if quantized:
        del reference
        reference = PeftModel.from_pretrained(load_base(base, dtype, precision), str(info.path))
    pending = [reference.merge_and_unload()]
    del reference
    for note in notes:
        echo(f"note: {note}")
    echo(f"merging {info.path} into {base.path} ({'dequantized nf4' if precision == 'dequantized' else 'full-precision'} weights, {dtype_name(dtype)})")
    loaded_back = []

    def save(folder: Path):
        pending.pop().save_pretrained(folder)  # one model in memory at a time: the merged one goes before the reload
        loaded_back.append(load_base(folder, dtype, "full"))
        return logits_of(loaded_back[0], inputs)

    recipe = info.card.recipe
    if recipe is not None:
        # The merged model is plain weights; the source's quantization is under merge.adapters.
        recipe = recipe.model_copy(update={"quantization": "none"})
    hint = "; --base-precision dequantized merges into the weights the adapter was trained against" if quantized and precision == "full" else ""
    reference_of = Reference(ref_logits, ref_name, samples, effect=effect, effect_key="adapter_effect_max_abs_logit", effect_words="the adapter itself moves logits by up to")
    card = write_verified(out, save, processor, reference=reference_of, tolerance=tolerance, echo=echo, hint=hint,
                          card=lambda verification: Card.new(
                              "model", made_by="kit merge", base=base.source(), recipe=recipe, notes=notes, verification=verification,
                              merge={"method": "single", "adapters": [source_entry(info)], "base_precision": precision,
                                     "dtype": dtype_name(dtype)}))
    return Merged(Path(out), loaded_back[0], processor, card=card)
