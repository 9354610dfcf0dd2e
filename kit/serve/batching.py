"""Continuous batching for `kit serve`: a request joins the rows being decoded at the next step,
and a row leaves the moment it is done, so throughput does not depend on when requests arrive.

Requests that arrive together are prefilled together (left-padded, every processor tensor, as
`generate` starts a batch; those with images apart from those without), their first tokens picked,
and their KV cache joined to the live batch: every layer is left-padded to a common length and
masked, and every row keeps its own positions (multimodal-RoPE models their own offset), so a
greedy answer does not depend on its neighbours.
Each step then decodes one token for every live row. A row leaves at its own end (a stop token,
its own max_tokens, a stop string seen by its reader, or a cancel), and the cache drops it at once.

Rows of one live batch share a served name (base or adapter; the adapter is chosen per step).
Requests for another name wait until the requests ahead of them have drained the batch: joining
stops as soon as the oldest waiting request is for another name, so no name starves. Tokens are
picked per row: greedy, or sampled with the row's own temperature / top-p, a seeded row from its
own random stream (so its answer does not depend on what else is running). The checkpoint's
`repetition_penalty`, which `generate` would apply, is applied per row over its own tokens.

transformers' own continuous batching (`generate_batch`, `init_continuous_batching`) takes token
ids only: no pixel values or other processor tensors, and one model state for all requests (no
per-request adapter), so kit serves images through this loop instead. A model whose cache kit
cannot pad (anything but transformers' dynamic full / sliding-window layers) decodes the requests
that arrived together, and takes new ones when they are done.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import torch
from transformers import RepetitionPenaltyLogitsProcessor
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kit.core import options
from kit.core.precision import to_model
from kit.data.processing import TOKEN_KEYS, collate
from kit.infer.generation import Answer, Sampling, pad_id, stop_ids

PADDABLE = (DynamicLayer, DynamicSlidingWindowLayer)


class BatchedAnswer(Answer):
    """One request's answer, decoded by a Batcher alongside whatever else is running."""

    def __init__(self, name: str, tokenizer, inputs: dict[str, Any], sampling: Sampling):
        super().__init__(tokenizer, inputs, sampling)
        self.name = name
        self.live = True  # still generating
        self.tokens: list[int] = inputs["input_ids"][0].tolist()  # prompt, then answer: the repetition penalty's view
        self.generator: torch.Generator | None = None
        # Its own streamer skips the first thing put into it (generate's prompt).
        self._streamer.put(torch.zeros(1, 1, dtype=torch.long))

    def _emit(self, token: int, stops: set[int]) -> None:
        """One new token of this row."""
        self.completion_tokens += 1
        self.tokens.append(token)
        if token in stops:
            self._close("stop")
            return
        self._streamer.put(torch.tensor([token]))
        if self.completion_tokens >= self.sampling.max_new_tokens:
            self._close("length")
        elif self.cancelled:
            self._close("stop")

    def _close(self, reason: str) -> None:
        if self.live:
            self.live = False
            self.finish_reason = reason
            self._streamer.end()
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._close("stop")


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class LiveBatch:
    """The rows decoded together: one KV cache left-padded to a common length, the attention mask
    over it, each row's next position and its last token."""

    def __init__(self):
        self.rows: list[BatchedAnswer] = []
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.last = None

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[BatchedAnswer], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
             tokens: torch.Tensor) -> None:
        """Add prefilled rows: their cache and attention mask (left-padded), the position each one's
        next token takes and the token each just picked."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = list(rows), cache, mask, positions, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            n = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([_pad_left(mine.keys, n, -2), _pad_left(theirs.keys, n, -2)])
            mine.values = torch.cat([_pad_left(mine.values, n, -2), _pad_left(theirs.values, n, -2)])
            if isinstance(mine, DynamicSlidingWindowLayer):
                mine.cumulative_length = width  # tokens seen, padding included: what the mask spans
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows += rows
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows; columns that are padding in every remaining row are cut."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.__init__()
            return
        idx = torch.tensor(indices, device=self.mask.device)
        self.rows = [self.rows[i] for i in indices]
        self.cache.batch_select_indices(idx)
        self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if unused and paddable(self.cache):
            width = self.mask.shape[1]
            for layer in self.cache.layers:
                drop = unused - (width - layer.keys.shape[-2])  # a sliding layer holds only its window
                if drop > 0:
                    layer.keys, layer.values = layer.keys[..., drop:, :], layer.values[..., drop:, :]
                if isinstance(layer, DynamicSlidingWindowLayer):
                    layer.cumulative_length -= unused
            self.mask = self.mask[:, unused:]

    def step(self, model) -> torch.Tensor:
        """Decode one token for every row; the next-token logits, one row each."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        out = model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                    cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.positions = self.positions + 1
        return out.logits[:, -1, :]


def paddable(cache) -> bool:
    return isinstance(cache, DynamicCache) and all(type(layer) in PADDABLE and layer.is_initialized for layer in cache.layers)


class Picker:
    """How a row's next token is chosen from its logits (see the module doc)."""

    def __init__(self, model):
        penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
        self.penalty = RepetitionPenaltyLogitsProcessor(penalty) if penalty not in (None, 1.0) else None

    def __call__(self, row: BatchedAnswer, logits: torch.Tensor) -> int:
        scores = logits[None].float()
        if self.penalty is not None:
            scores = self.penalty(torch.tensor([row.tokens], device=scores.device), scores)
        s = row.sampling
        if s.temperature <= 0:
            return int(scores.argmax(-1))
        scores = scores[0] / s.temperature
        if s.top_p < 1.0:
            ordered, idx = torch.sort(scores, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= s.top_p  # keep the smallest set whose mass reaches top_p
            scores[idx[drop]] = float("-inf")
        if s.seed is not None and row.generator is None:
            row.generator = torch.Generator(device=scores.device).manual_seed(s.seed)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator))


class Batcher:
    """Decodes BatchedAnswers submitted from any thread on `model`, continuously (see the module doc).

    `lock` is held for each prefill and each decode step, `select(name)` entered around them.
    `batches` counts the live batches started (from no rows to some), `largest` the most rows
    decoded in one step, `sizes` the rows of each recent step; tests and benchmarks read them."""

    def __init__(self, model, tokenizer_of, select, lock: threading.Lock, max_batch: int = options.MAX_BATCH):
        self.model, self.tokenizer_of, self.select, self.lock = model, tokenizer_of, select, lock
        self.max_batch = max(1, max_batch)
        self.pending: deque[BatchedAnswer] = deque()
        self.cond = threading.Condition()
        self.live = LiveBatch()
        self.batches = 0
        self.largest = 0
        self.sizes: deque[int] = deque(maxlen=4096)
        self.closed = False
        self.picker = Picker(model)
        self.stops: dict[str, set[int]] = {}
        self.rope_holders = [m for m in model.modules() if hasattr(m, "rope_deltas")]
        self.joinable = True  # until a model's cache turns out not to be paddable
        # Stopped and joined by close() before the interpreter exits: a daemon thread caught inside
        # a forward pass at exit dies in torch's C++ destructors and aborts the process.
        self._thread = threading.Thread(target=self._loop, name="kit-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking requests, end what is pending or running, and wait for the loop to stop."""
        with self.cond:
            self.closed = True
            left, self.pending = list(self.pending), deque()
            self.cond.notify_all()
        for a in left:
            a.cancel()
            a._close("stop")
        self._thread.join(timeout)

    def submit(self, answer: BatchedAnswer) -> BatchedAnswer:
        with self.cond:
            self.pending.append(answer)
            self.cond.notify()
        return answer

    def _admit(self) -> list[BatchedAnswer]:
        """The waiting requests that join the live batch now (waits while there is nothing to do)."""
        with self.cond:
            while not self.pending and not self.live and not self.closed:
                self.cond.wait()
            if self.closed:
                return []
            room = self.max_batch - len(self.live) if self.joinable or not self.live else 0
            name = self.live.rows[0].name if self.live else (self.pending[0].name if self.pending else None)
            joining = []
            while self.pending and len(joining) < room and self.pending[0].name == name:
                joining.append(self.pending.popleft())
            return joining

    def _loop(self) -> None:
        try:
            while not self.closed:
                joining = self._admit()
                for r in joining:
                    if r.cancelled:
                        r._close("stop")
                # Rows with images and rows without are prefilled apart: some families' image tensors
                # are per row of the batch and cannot hold a row with no image.
                groups: dict[tuple, list[BatchedAnswer]] = {}
                for r in joining:
                    if r.live:
                        groups.setdefault(tuple(sorted(k for k in r.inputs if k not in TOKEN_KEYS)), []).append(r)
                for group in groups.values():
                    self._prefill(group)
                if self.live:
                    self._decode()
        finally:
            for row in self.live.rows:
                row._close("stop")
            self.live = LiveBatch()

    def _prefill(self, rows: list[BatchedAnswer]) -> None:
        """One forward over the rows' prompts, left-padded; their first tokens; then they join."""
        tokenizer = self.tokenizer_of(rows[0].name)
        stops = self._stops(rows[0].name)
        try:
            per_row = [{k: (v[0] if k in TOKEN_KEYS else v) for k, v in r.inputs.items()} for r in rows]
            inputs = collate(per_row, pad_id(tokenizer, sorted(stops)), padding_side="left")
            mask = inputs["attention_mask"]
            extra = {}
            if not self.rope_holders or set(inputs) <= set(TOKEN_KEYS):
                # Positions count real tokens only, as generate counts them; multimodal RoPE numbers
                # a prompt with images itself (by each image's grid, skipping the padding).
                extra["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            with self.lock, self.select(rows[0].name), torch.no_grad():
                for m in self.rope_holders:
                    m.rope_deltas = None  # left by the previous prefill; this one sets its own, or none
                out = self.model(**to_model({**inputs, **extra}, self.model), use_cache=True)
                offsets = self._rope_offsets(len(rows))
            mask = mask.to(out.logits.device)
            positions = mask.sum(1)  # the next token's: after the real tokens
            if offsets is not None:  # shifted by what multimodal RoPE's image grids took or gave
                positions = positions + offsets.to(mask.device)
            if not self.live:
                self.batches += 1
            tokens = [self.picker(r, out.logits[i, -1]) for i, r in enumerate(rows)]
        except BaseException as e:  # noqa: BLE001 - each reader raises it from its own iteration
            for r in rows:
                r._fail(e)
            return
        for r, t in zip(rows, tokens):
            r._emit(t, stops)
        keep = [i for i, r in enumerate(rows) if r.live]
        if not keep:
            return
        cache = out.cache
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=mask.device))
        if not paddable(cache):
            self.joinable = False
        idx = torch.tensor(keep, device=mask.device)
        self.live.join([rows[i] for i in keep], cache, mask[idx], positions=positions[idx],
                       tokens=torch.tensor(tokens, device=mask.device)[idx])
        self.largest = max(self.largest, len(self.live))

    def _rope_offsets(self, n: int) -> torch.Tensor | None:
        """Multimodal RoPE (Qwen-VL) shifts text positions after an image by an offset per row that
        the model works out in the prefill and keeps on itself; None when it kept none."""
        for m in self.rope_holders:
            deltas = getattr(m, "rope_deltas", None)
            if isinstance(deltas, torch.Tensor):
                return deltas.reshape(-1).expand(n) if deltas.numel() == 1 else deltas.reshape(-1)
        return None

    def _stops(self, name: str) -> set[int]:
        if name not in self.stops:
            self.stops[name] = set(stop_ids(self.model, self.tokenizer_of(name)))
        return self.stops[name]

    def _decode(self) -> None:
        live = self.live
        for r in live.rows:
            if r.cancelled:
                r._close("stop")
        live.keep([i for i, r in enumerate(live.rows) if r.live])
        if not live:
            return
        stops = self._stops(live.rows[0].name)
        try:
            with self.lock, self.select(live.rows[0].name), torch.no_grad():
                logits = live.step(self.model)
            self.largest = max(self.largest, len(live))
            self.sizes.append(len(live))
            tokens = [self.picker(r, logits[i]) for i, r in enumerate(live.rows)]
        except BaseException as e:  # noqa: BLE001 - every reader of the batch raises it
            for r in live.rows:
                r._fail(e)
            self.live = LiveBatch()
            return
        for r, t in zip(live.rows, tokens):
            r._emit(t, stops)
        live.last = torch.tensor(tokens, device=live.last.device)
        live.keep([i for i, r in enumerate(live.rows) if r.live])
