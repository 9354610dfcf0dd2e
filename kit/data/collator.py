"""Batches for training: padding, and logits only where the loss needs them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kit.data.dataset import IGNORE
from kit.data.processing import collate


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is supervised in any row: the only logits the loss needs."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def supervised_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token loss from logits computed only at `supervised_positions` (see Collator)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]  # [B, K, V]
    target = labels[:, supervised_positions(labels) + 1]  # [B, K]
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1).to(logits.device), ignore_index=IGNORE, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE).sum()
    return total / count


@dataclass
class Collator:
    pad_token_id: int
    # Training only: ask the model for logits at supervised positions. The image tokens and the
    # prompt (most of a LLaVA sequence) then never reach the LM head: less time, far less memory.
    supervised_logits_only: bool = False

    def __call__(self, batch: list[dict]) -> dict:
        out = collate(batch, self.pad_token_id)
        if self.supervised_logits_only:
            out["logits_to_keep"] = supervised_positions(out["labels"])
        return out
