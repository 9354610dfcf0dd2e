"""What a preference run (`train.objective: dpo`) records and removes; the trainer is kit.train.dpo.

Kept apart from the trainer so an SFT run never imports trl.
"""

from __future__ import annotations


from kit.core.recipes import Recipe

REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of the starting adapter
LOGGED = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


def drop_reference(model) -> None:
    """Remove TRL's frozen "ref" adapter before the final save: the saved adapter is the trained one only."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)


def preference_record(recipe: Recipe, report, log_history: list[dict]) -> dict:
    """What the card says about a preference run: its settings, its pairs per edit kind, and the
    reward margin (chosen minus rejected, in beta-scaled log-ratio) at its first and last log."""
    margins = [h["rewards/margins"] for h in log_history if "rewards/margins" in h]
    accuracies = [h["rewards/accuracies"] for h in log_history if "rewards/accuracies" in h]
    return {
        **recipe.preference.model_dump(mode="json"),
        "from": recipe.model.adapter,
        "pairs": {"used": report.total - len(report.problems), "by_edit": dict(report.edits)},
        "reward_margin": {"first": margins[0], "last": margins[-1]} if margins else None,
        "reward_accuracy": {"first": accuracies[0], "last": accuracies[-1]} if accuracies else None,
    }
