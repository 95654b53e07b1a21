"""Answer scoring with the conventions of lmms-eval / the benchmarks' official scripts, one function per
metric, each taking a prediction and the list of reference answers and returning a score in [0, 1]:

  exact_match       1 if the normalised prediction equals any normalised reference (lower case, no
                    punctuation, no articles, collapsed spaces; the SQuAD/lmms-eval normalisation).
  vqa_accuracy      VQAv2 / TextVQA / VizWiz: both sides go through the EvalAI answer processor
                    (punctuation, digits for number words, articles, contractions); with the usual ten
                    human answers, the mean over the ten leave-one-out subsets of min(1, matches / 3).
                    With fewer references the same formula is applied to what is there (one reference:
                    1 if it matches).
  anls              DocVQA / InfoVQA / ST-VQA: max over references of 1 - NL(pred, ref) when NL < 0.5,
                    else 0, NL = Levenshtein distance / longer length, both lower-cased and stripped.
  relaxed_accuracy  ChartQA: numbers (a trailing % is divided by 100) within 5% relative error of a
                    numeric reference (exactly equal when it is 0), other answers case-insensitively
                    equal; max over references.
  object_f1         The synthetic world's list answers (captioning, quadrant): F1 over (colour, shape)
                    phrases (`workers.training.eval_report.object_f1`).

`pick_metric` chooses per task when the caller does not: relaxed_accuracy for chart tasks, anls for
document/infographic tasks, vqa_accuracy where rows carry several reference answers, else exact_match.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from rapidfuzz.distance import Levenshtein

# ---- exact match --------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    text = _PUNCT.sub(" ", str(text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, refs: Sequence[str]) -> float:
    p = normalise(pred)
    return float(any(p == normalise(r) for r in refs))


# ---- VQA accuracy (EvalAI answer processing) ----------------------------------------------------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id": "I'd", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "its": "it's",
    "lets": "let's", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalise(text: str) -> str:
    """The EvalAI / VQA answer processor: spacing, punctuation, number words, articles, contractions."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for word in out.split():
        word = _NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(pred: str, refs: Sequence[str]) -> float:
    if not refs:
        return 0.0
    p = vqa_normalise(pred)
    gold = [vqa_normalise(r) for r in refs]
    if len(gold) == 1:
        return float(p == gold[0])
    scores = []
    for i in range(len(gold)):
        others = gold[:i] + gold[i + 1:]
        scores.append(min(1.0, sum(g == p for g in others) / 3.0))
    return sum(scores) / len(scores)


# ---- ANLS ----------------------------------------------------------------------------------------
def anls(pred: str, refs: Sequence[str], threshold: float = 0.5) -> float:
    p = " ".join(str(pred).strip().lower().split())
    best = 0.0
    for r in refs:
        g = " ".join(str(r).strip().lower().split())
        longest = max(len(p), len(g))
        nl = Levenshtein.distance(p, g) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ---- relaxed accuracy ----------------------------------------------------------------------------
def _to_float(text: str):
    text = str(text).strip()
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, refs: Sequence[str], tolerance: float = 0.05) -> float:
    p = str(pred).strip().rstrip(".")
    for r in refs:
        pf, rf = _to_float(p), _to_float(r)
        if pf is not None and rf is not None:
            ok = pf == rf if rf == 0 else abs(pf - rf) / abs(rf) <= tolerance
        else:
            ok = p.lower() == str(r).strip().lower()
        if ok:
            return 1.0
    return 0.0


def object_f1(pred: str, refs: Sequence[str]) -> float:
    from workers.training.eval_report import object_f1 as f1

    return max((f1(pred, r) for r in refs), default=0.0)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match, "vqa_accuracy": vqa_accuracy, "anls": anls, "relaxed_accuracy": relaxed_accuracy,
    "object_f1": object_f1,
}


def pick_metric(task: str, max_refs: int) -> str:
    """The lmms-eval metric for a task name (chartqa -> relaxed accuracy; docvqa/infovqa/st-vqa -> ANLS;
    several reference answers -> VQA accuracy; otherwise exact match)."""
    t = (task or "").lower().replace("-", "").replace("_", "")
    if "chart" in t:
        return "relaxed_accuracy"
    if any(name in t for name in ("docvqa", "infovqa", "infographic", "stvqa")):
        return "anls"
    if max_refs >= 3:
        return "vqa_accuracy"
    return "exact_match"


def score(metric: str, pred: str, refs: Sequence[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](pred, list(refs))
