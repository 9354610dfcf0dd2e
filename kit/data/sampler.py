"""LLaVA's modality + length grouping: image and text-only samples never share a batch, and
each batch holds samples of similar length, so padding (and wasted compute) stays small."""

from __future__ import annotations

import torch


def _grouped(indices: list[int], lengths: list[int], megabatch: int, g: torch.Generator) -> list[list[int]]:
    """Shuffle, cut into megabatches, sort each by length (longest first)."""
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    chunks = [order[i : i + megabatch] for i in range(0, len(order), megabatch)]
    return [sorted(c, key=lambda i: -abs(lengths[i])) for c in chunks]


def modality_length_order(lengths: list[int], batch_size: int, megabatch_batches: int, seed: int) -> list[int]:
    """A permutation of range(len(lengths)).

    `lengths` are positive for image samples, negative for text-only ones. Within a modality,
    megabatches of `batch_size * megabatch_batches` are sorted by length and cut into batches;
    the batches of both modalities are then shuffled together. Deterministic in `seed`.
    """
    g = torch.Generator().manual_seed(seed)
    mega = batch_size * megabatch_batches
    batches: list[list[int]] = []
    leftovers: list[int] = []
    for want_image in (True, False):
        idx = [i for i, n in enumerate(lengths) if (n > 0) == want_image]
        for chunk in _grouped(idx, lengths, mega, g=g):
            for i in range(0, len(chunk), batch_size):
                b = chunk[i : i + batch_size]
                (batches.append(b) if len(b) == batch_size else leftovers.extend(b))
    perm = torch.randperm(len(batches), generator=g).tolist()
    out = [i for p in perm for i in batches[p]]
    return out + leftovers  # the few mixed leftovers go last, as one (possibly mixed) tail batch


class ModalityLengthSampler(torch.utils.data.Sampler):
    def __init__(self, lengths: list[int], batch_size: int, megabatch_batches: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.megabatch_batches = megabatch_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(modality_length_order(self.lengths, self.batch_size, self.megabatch_batches, seed=self.seed + self.epoch))
