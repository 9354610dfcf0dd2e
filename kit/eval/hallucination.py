"""Hallucination measured on your own images: POPE on yes/no probes, CHAIR on descriptions.

POPE (arXiv 2305.10355): an answer that holds the word "no" or "not" is a no, anything else a yes
(lmms-eval's reading); "yes" is the positive class. Per probe set (random, popular, adversarial)
and over all: accuracy, precision, recall, F1 and the share of yes answers. A model that always
says yes gets accuracy 50, precision 50, recall 100, F1 66.7, yes-ratio 100 on balanced probes.

CHAIR (arXiv 1809.02156), with kit's claim check instead of COCO's word lists: the objects a
description mentions are its `object` claims (kit.ground.claims: concepts of the vocabulary named
and not negated); CHAIR_i = mentioned objects the image's facts do not support (unsupported or
contradicted) / all mentioned objects, counted once per description; CHAIR_s = descriptions with
at least one such object / all descriptions.

Every number has its count and a 95% percentile bootstrap interval (items resampled; for CHAIR_i,
descriptions resampled and the ratio of sums recomputed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kit.data.vqa import words
from kit.eval.metrics import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED
from kit.ground.claims import Claim, check_text
from kit.ground.facts import Facts
from kit.ground.probes import SETS
from kit.ground.vocab import load_vocab

POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def says_yes(prediction: str) -> bool:
    w = set(words(prediction))
    return not ({"no", "not"} & w)


def _pope_values(truth: np.ndarray, said: np.ndarray) -> np.ndarray:
    """[samples, n] booleans -> [samples, 5]: accuracy, precision, recall, F1, yes-ratio (0..1)."""
    tp = (truth & said).sum(-1)
    fp = (~truth & said).sum(-1)
    fn = (truth & ~said).sum(-1)
    n = truth.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    accuracy = (truth == said).sum(-1) / n
    return np.stack([accuracy, precision, recall, f1, said.sum(-1) / n], axis=-1)


def pope(truth: list[bool], said: list[bool], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """POPE scores (0..1) of answers `said` (True = yes) against `truth`, with n and 95% intervals."""
    if not truth:
        return {"n": 0}
    t, s = np.asarray(truth, dtype=bool), np.asarray(said, dtype=bool)
    point = _pope_values(t[None], s[None])[0]
    idx = np.random.default_rng(seed).integers(0, len(t), size=(samples, len(t)))
    boot = _pope_values(t[idx], s[idx])
    out: dict[str, Any] = {"n": len(t)}
    for k, key in enumerate(POPE_KEYS):
        out[key] = float(point[k])
        out[f"{key}_ci"] = (float(np.percentile(boot[:, k], 2.5)), float(np.percentile(boot[:, k], 97.5)))
    return out


def pope_by_set(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """POPE per probe set present, and over all probes."""
    probes = [p for p in predictions if p.get("probe")]
    out = {}
    for name in (*SETS, "all"):
        rows = [p for p in probes if name == "all" or p["probe"]["set"] == name]
        if rows:
            out[name] = pope([p["answer"] == "yes" for p in rows], [p["said_yes"] for p in rows])
    return out


def facts_from_json(data: dict[str, Any], vocab) -> Facts:
    present, absent = set(data.get("present", [])), set(data.get("absent", []))
    return Facts(present=present, absent=absent, counts=dict(data.get("counts", {})),
                 centres={k: [tuple(c) for c in v] for k, v in data.get("centres", {}).items()},
                 groups={vocab.concepts[c].group for c in present | absent if c in vocab.concepts})


def description_claims(prediction: str, facts: dict[str, Any], vocab_ref: str) -> list[Claim]:
    vocab = load_vocab(vocab_ref)
    return check_text(prediction, facts_from_json(facts, vocab), vocab)


def object_counts(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per description: the objects it mentions and those of them its image's facts do not
    support, each concept counted once ([n] floats, [n] floats)."""
    mentioned, bad = [], []
    for p in rows:
        objects: dict[str, bool] = {}
        for c in p["claims"]:
            if c["kind"] == "object":
                objects[c["concept"]] = objects.get(c["concept"], False) or c["status"] != "supported"
        mentioned.append(len(objects))
        bad.append(sum(objects.values()))
    return np.asarray(mentioned, dtype=np.float64), np.asarray(bad, dtype=np.float64)


def chair(predictions: list[dict[str, Any]], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """CHAIR_i and CHAIR_s (0..1) over describe predictions (each with its `claims`)."""
    rows = [p for p in predictions if p.get("answer_type") == "describe"]
    if not rows:
        return {"n": 0}
    m, b = object_counts(rows)
    idx = np.random.default_rng(seed).integers(0, len(m), size=(samples, len(m)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot_i = np.where(m[idx].sum(1) > 0, b[idx].sum(1) / np.maximum(m[idx].sum(1), 1), 0.0)
    boot_s = (b[idx] > 0).mean(1)
    return {
        "n": len(rows), "objects": int(m.sum()),
        "chair_i": float(b.sum() / m.sum()) if m.sum() else 0.0,
        "chair_i_ci": (float(np.percentile(boot_i, 2.5)), float(np.percentile(boot_i, 97.5))),
        "chair_s": float((b > 0).mean()),
        "chair_s_ci": (float(np.percentile(boot_s, 2.5)), float(np.percentile(boot_s, 97.5))),
    }


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def format_hallucination(result: dict[str, Any]) -> str:
    """POPE (per set) and CHAIR tables, in percent, or "" when the run had neither."""
    lines = []
    sets = result.get("pope") or {}
    if sets:
        lines.append(f"{'POPE set':12} | {'accuracy':>8} | {'precision':>9} | {'recall':>7} | {'F1':>6} | {'F1 95% interval':>16} | "
                     f"{'yes %':>6} | n")
        for name, s in sets.items():
            lines.append(f"{name:12} | {_pct(s['accuracy']):>8} | {_pct(s['precision']):>9} | {_pct(s['recall']):>7} | "
                         f"{_pct(s['f1']):>6} | {_ci(s['f1_ci']):>16} | {_pct(s['yes_ratio']):>6} | {s['n']}")
    c = result.get("chair") or {}
    if c.get("n"):
        lines.append(f"CHAIR_i {_pct(c['chair_i'])} {_ci(c['chair_i_ci'])} ({c['objects']} objects mentioned), "
                     f"CHAIR_s {_pct(c['chair_s'])} {_ci(c['chair_s_ci'])} ({c['n']} descriptions)")
    return "\n".join(lines)


def _paired(values, n: int, samples: int, seed: int) -> tuple[float, float]:
    """95% interval of values(idx) over bootstrap index draws shared by both runs."""
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    diffs = values(idx)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def hallucination_changes(before: dict[str, Any], after: dict[str, Any], samples: int = BOOTSTRAP_SAMPLES,
                          seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Adapted minus base: POPE F1 per set and CHAIR_i / CHAIR_s, each with a paired 95% bootstrap
    interval (the same probes / descriptions drawn for both runs). Empty when the runs had none or
    answered different items."""
    out: dict[str, Any] = {}
    b_preds, a_preds = before["predictions"], after["predictions"]
    if [p["id"] for p in b_preds] != [p["id"] for p in a_preds]:
        return out
    for name in (*SETS, "all"):
        rows = [i for i, p in enumerate(b_preds) if p.get("probe") and (name == "all" or p["probe"]["set"] == name)]
        if not rows:
            continue
        truth = np.asarray([b_preds[i]["answer"] == "yes" for i in rows])
        said_b = np.asarray([b_preds[i]["said_yes"] for i in rows])
        said_a = np.asarray([a_preds[i]["said_yes"] for i in rows])
        def f1(said, idx, truth=truth):
            return _pope_values(truth[idx], said[idx])[:, 3]

        whole = np.arange(len(rows))[None]
        out[f"pope_f1_{name}"] = {"change": float(f1(said_a, whole)[0] - f1(said_b, whole)[0]),
                                  "ci": _paired(lambda idx: f1(said_a, idx) - f1(said_b, idx), len(rows), samples, seed=seed)}
    rows = [i for i, p in enumerate(b_preds) if p["answer_type"] == "describe"]
    if rows:
        (mb, bb), (ma, ba) = object_counts([b_preds[i] for i in rows]), object_counts([a_preds[i] for i in rows])

        def chair_i(m, b, idx):
            ms, bs = m[idx].sum(-1), b[idx].sum(-1)
            return np.where(ms > 0, bs / np.maximum(ms, 1), 0.0)

        whole = np.arange(len(rows))[None]
        out["chair_i"] = {"change": float(chair_i(ma, ba, whole)[0] - chair_i(mb, bb, whole)[0]),
                          "ci": _paired(lambda idx: chair_i(ma, ba, idx) - chair_i(mb, bb, idx), len(rows), samples, seed=seed)}
        out["chair_s"] = {"change": float((ba > 0).mean() - (bb > 0).mean()),
                          "ci": _paired(lambda idx: (ba[idx] > 0).mean(-1) - (bb[idx] > 0).mean(-1), len(rows), samples, seed=seed)}
    return out


def hallucination_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, float, float, dict[str, Any]]]:
    """(label, base, adapted, change) per POPE set's F1 and CHAIR_i / CHAIR_s, for the before/after table."""
    diff = hallucination_changes(before, after)
    rows = []
    for name in (*SETS, "all"):
        key = f"pope_f1_{name}"
        if key in diff:
            rows.append((f"POPE F1 {name}", before["pope"][name]["f1"], after["pope"][name]["f1"], diff[key]))
    for key in ("chair_i", "chair_s"):
        if key in diff:
            rows.append((key.replace("chair", "CHAIR"), before["chair"][key], after["chair"][key], diff[key]))
    return rows
