"""Continuous batching in `kit serve` (kit.serve.batching), on a tiny model of every family.

The reference is plain transformers: `model.generate` on each request alone, greedy. A request
submitted while another is mid-generation joins its batch, and every row's tokens equal that
reference exactly (ids, not text): padding, per-row positions (Qwen-VL's multimodal RoPE
offsets included) and sliding-window layers (Gemma 3) do not leak between rows.
"""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from tests import families


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _alone(model, inputs, tokenizer, budget: int) -> tuple[list[int], torch.Tensor]:
    """generate's greedy tokens and the raw logits it picked each from."""
    from kit.core.precision import to_model
    from kit.infer.generation import pad_id, stop_ids

    stops = stop_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(**to_model(inputs, model), max_new_tokens=budget, do_sample=False,
                             eos_token_id=stops, pad_token_id=pad_id(tokenizer, stops),
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.cat(out.logits).float()


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    """Poll `cond` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _join_mid_generation(base, text_only: bool = True):
    """Four requests on `base`: the last three (two with an image, one without) arrive together
    while the first is mid-generation. Their tokens must equal generate alone, and each row must leave at its own step."""
    from kit.infer.generation import Sampling
    from kit.serve.pool import load_pool

    pool = load_pool(base, echo=lambda m: None)
    try:
        name = pool.names[0]
        tok = pool.get(name).processor.tokenizer
        # Different image sizes (so different image-token counts where the family varies them) and
        # questions: the rows' prompts differ in length and content.
        asks = [([_image(48, 40, 1)], "What is shown?", 24),
                ([_image(64, 32, 2)], "Describe every colour you can see in this picture, one by one.", 5),
                ([_image(40, 56, 3)], "Where?", 9),
                ([] if text_only else [_image(32, 32, 4)], "Say something about nothing at all.", 7)]
        # (without an image it is prefilled in a group of its own)
        inputs = [pool.prepare(name, families.messages(len(imgs), q), imgs) for imgs, q, _ in asks]
        alone = [_alone(pool.model, x, tok, budget) for x, (_, _, budget) in zip(inputs, asks)]
        want = [ids for ids, _ in alone]
        assert [len(w) for w in want] == [24, 5, 9, 7], "a stop token came early: pick other prompts for this fixture"

        batcher = pool.batcher
        seen: dict[int, list[torch.Tensor]] = {}
        picker = batcher.picker

        def recording(row, logits):
            seen.setdefault(id(row), []).append(logits.float().clone())
            return picker(row, logits)

        batcher.picker = recording
        first = pool.start(name, inputs[0], Sampling(24))
        wait_until(lambda: first.completion_tokens >= 3, "the first request did not start")
        with batcher.cond:  # both arrive before the next step
            rest = [pool.start(name, x, Sampling(budget)) for x, (_, _, budget) in zip(inputs[1:], asks[1:])]
        rest[-1].result()
        assert first.live, "the joined requests were answered only after the running one finished"
        first.result()
        assert [r.tokens[r.prompt_tokens:] for r in (first, *rest)] == want
        # Not only the same argmax: the same logits (positions, masks and caches are right, not merely close).
        for r, (_, logits) in zip((first, *rest), alone):
            torch.testing.assert_close(torch.stack(seen[id(r)]), logits, atol=1e-4, rtol=1e-4)
        assert all(r.finish_reason == "length" for r in (first, *rest))
        # Rows leave at their own step: after the joins (one token each from its prefill), 4 steps
        # decode 4 rows (the 5-token budget ends), 2 decode 3 (the 7), 2 decode 2 (the 9), the rest the first alone.
        sizes = list(batcher.sizes)
        joined = sizes.index(4)
        assert set(sizes[:joined]) == {1} and sizes[joined:] == [4] * 4 + [3] * 2 + [2] * 2 + [1] * (len(sizes) - joined - 8)
        assert len(sizes) == 23  # the first's 24 tokens: one from its prefill, one per step
    finally:
        pool.close()


@pytest.mark.parametrize("family", families.FAMILIES)
def test_a_request_joins_a_running_batch_and_answers_as_alone(family, smol_tokenizer_dir, tmp_path):
    # PaliGemma's prompt format is an image, then a question: every request has an image.
    _join_mid_generation(families.save(family, smol_tokenizer_dir, tmp_path / family), text_only=family != "paligemma")


def test_sliding_window_layers_join_past_their_window(smol_tokenizer_dir, tmp_path):
    """Gemma 3 with a 6-token window on one of its two layers: every prompt is longer than the
    window, so the joined caches hold windows cut at different points of different lengths."""
    import json

    base = families.save("gemma3", smol_tokenizer_dir, tmp_path / "gemma3")
    cfg = json.loads((base / "config.json").read_text())
    cfg["text_config"].update(sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    (base / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(base).text_config.sliding_window == 6
    _join_mid_generation(base)
