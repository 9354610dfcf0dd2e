"""VQA scoring: LLaVA-Med's published metric, kit's stricter one, and bootstrap intervals.

`llava-med` scores as LLaVA-Med v1.0.0's `llava/eval/run_eval_batch.py` (the scorer behind its
VQA-RAD / SLAKE / PathVQA tables), with the questions asked as written:
- both texts are lowercased and normalised (its punctuation list, periods cut unless a digit follows,
  number words to digits, articles dropped, contractions spelled one way; llava_med_words.yaml);
- closed: 1 when the normalised answer is a substring of the normalised prediction ("no" is found
  in "not" and "normal"; any closed answer, yes/no or not, is scored this way);
- open: recall of the answer's words, where a matched word counts as often as the prediction
  repeats it (so "left left" recalls 2 of the 2 words of "left lung"); 0 when nothing matches.

`strict` is kit's own: a closed yes/no question is right when the prediction's first yes/no word is
the answer, another closed answer ("left", "CT") when the prediction's words start with the
answer's words; open recall is the share of the answer's words found in the prediction (a repeated
prediction word counts once). Its prompts append a short-answer instruction (kit.data.vqa.SUFFIX).
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from kit.core.errors import KitError
from kit.data.vqa import is_yes_no, words, yes_no

METRIC_NAMES = ("llava-med", "strict")
# How each metric asks its questions (kit.data.vqa.ask); recorded on cards next to the numbers.
PROMPT_STYLE = {"llava-med": "as-written", "strict": "short-answer"}
_WORDS_FILE = Path(__file__).with_name("llava_med_words.yaml")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
# The reference passes re.UNICODE where `sub` takes its count: at most 32 periods are cut per text.
_PERIOD_LIMIT = int(re.UNICODE)


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, str], frozenset[str], tuple[str, ...], dict[str, str]]:
    data = yaml.safe_load(_WORDS_FILE.read_text())
    contractions = {variant: canonical for canonical, variants in data["contractions"].items() for variant in variants}
    return data["number_words"], frozenset(data["articles"]), tuple(data["punctuation"]), contractions


def llava_med_normalize(text: str) -> str:
    numbers, articles, punctuation, contractions = _tables()
    out = text
    joined_number = _COMMA_NUMBER.search(text) is not None
    for p in punctuation:
        # Glued punctuation ("left-sided") becomes a space; punctuation beside a space, or any text
        # holding a number like "1,000", loses it outright (the test reads the original text).
        out = out.replace(p, "" if (p + " " in text or " " + p in text or joined_number) else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_LIMIT)
    kept = []
    for word in out.lower().split():
        word = numbers.get(word, word)
        if word not in articles:
            kept.append(contractions.get(word, word))
    return " ".join(kept).replace(",", "")


def _prepared(text: str) -> str:
    # The scorer normalises once when it reads the texts, and again inside its recall function.
    return llava_med_normalize(llava_med_normalize(str(text).lower()))


def llava_med_closed(prediction: str, answer: str) -> float:
    return float(llava_med_normalize(str(answer).lower()) in llava_med_normalize(str(prediction).lower()))


def llava_med_open_recall(prediction: str, answer: str) -> float:
    pred = Counter(_prepared(prediction).split())
    ref = Counter(_prepared(answer).split())
    if not pred or not ref:
        return 0.0
    hit = sum(n for w, n in pred.items() if w in ref)
    missed = sum(n for w, n in ref.items() if w not in pred)
    return hit / (hit + missed) if hit else 0.0


def strict_closed(prediction: str, answer: str) -> float:
    a, p = words(answer), words(prediction)
    if is_yes_no(answer):
        return float(yes_no(prediction) == a[0])
    return float(bool(a) and p[: len(a)] == a)


def strict_open_recall(prediction: str, answer: str) -> float:
    want = words(answer)
    if not want:
        return 0.0
    have = set(words(prediction))
    return sum(w in have for w in want) / len(want)


def check_metric(metric: str) -> str:
    if metric not in METRIC_NAMES:
        raise KitError(f"unknown metric '{metric}'; choose one of {', '.join(METRIC_NAMES)}")
    return metric


def score(prediction: str, answer: str, answer_type: str, metric: str = "llava-med") -> float:
    if check_metric(metric) == "llava-med":
        return llava_med_closed(prediction, answer) if answer_type == "closed" else llava_med_open_recall(prediction, answer)
    return strict_closed(prediction, answer) if answer_type == "closed" else strict_open_recall(prediction, answer)


# ---------------------------------------------------------------------------------- intervals

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def interval(scores: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the mean (questions resampled); None without questions."""
    if not scores:
        return None
    x = np.asarray(scores, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))
    means = x[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def change_interval(before: list[float], after: list[float], samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """95% paired bootstrap interval of mean(after) - mean(before): the same questions are drawn
    for both, so the question mix does not count as a change."""
    if not before or len(before) != len(after):
        return None
    return interval(list(np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)), samples, seed)
