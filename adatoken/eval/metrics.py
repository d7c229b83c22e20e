"""3D question-answering metrics, computed the way 3D-LMM papers report them.

EM@1 and refined EM follow the ScanQA/SQA3D evaluators of LLaVA-3D, which took their answer
cleaning and matching from LEO (embodied-generalist). BLEU-1..4, ROUGE-L and CIDEr come from
pycocoevalcap's own scorers; METEOR from pycocoevalcap's meteor-1.5.jar, which needs Java. Where a
metric cannot be computed it is None and `unavailable` says why: never a silent 0.

pycocoevalcap is an optional dependency (`pip install "adatoken[eval]"`), imported only when the
n-gram metrics are computed: EM and refined EM (`ngram=False`) need nothing beyond the standard
library, and asking for the n-gram metrics without it raises an ImportError that says what to install.

All scores are fractions in [0, 1] (CIDEr in [0, 10]); papers print them multiplied by 100.
docs/metrics.md describes every rule here and where the two reference evaluators differ.
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

__all__ = ["SQA3D_TYPES", "answer_match", "breakdown", "clean_answer", "exact_match", "score", "score_records",
           "sqa3d_question_type"]

STYLES = ("llava3d", "leo")
TOKENIZERS = ("ptb", "none")
# Each style's default tokenisation before the n-gram scorers: LLaVA-3D runs pycocoevalcap's
# PTBTokenizer (Java), LEO hands the cleaned strings to the scorers as they are.
DEFAULT_TOKENIZER = {"llava3d": "ptb", "leo": "none"}
NGRAM_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor", "cider")
# SQA3D's question types, in the order (and with the indices 0..5) the reference evaluators use.
SQA3D_TYPES = ("what", "is", "how", "can", "which", "other")

# --- answer cleaning -------------------------------------------------------------------------
# The reference cleaner is a chain of regex substitutions; the order is part of the definition
# (e.g. whitespace is trimmed *before* punctuation is removed, so "left ." cleans to "left ").
# Its two substitutions "ç"->"c" and "’"->"'" run after the character filter has already removed
# those characters, so they never fire and are left out here.
_TYPO_FIXES = {
    "letf": "left", "let": "left", "tehre": "there", "rigth": "right", "rght": "right",
    "behine": "behind", "tv": "TV", "chai": "chair", "wasing": "washing", "waslked": "walked",
    "oclock": "o'clock",
}
_NUMBER_WORDS = {
    "0": "zero", "none": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
    "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten", "11": "eleven",
    "12": "twelve", "13": "thirteen", "14": "fourteen", "15": "fifteen", "16": "sixteen",
    "17": "seventeen", "18": "eighteen", "19": "nineteen", "20": "twenty", "23": "twenty-three",
}


def _whole_words(table: dict[str, str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(map(re.escape, table)) + r")\b")


_TYPO_RE = _whole_words(_TYPO_FIXES)
_NUMBER_RE = _whole_words(_NUMBER_WORDS)
_CLEANING_STEPS: list[tuple[re.Pattern, object]] = [
    (re.compile(r" +$"), ""),                       # trim (spaces only, as the reference does)
    (re.compile(r"^ +"), ""),
    (re.compile(r" {2,}"), " "),                    # collapse runs of spaces
    (re.compile(r"\. {2,}"), ". "),
    (re.compile(r"[^a-zA-Z0-9,'\s\-:]+"), ""),      # keep letters, digits, , ' - : and whitespace
    (_TYPO_RE, lambda m: _TYPO_FIXES[m.group(1)]),
    (re.compile(r"\bo' +clock\b"), "o'clock"),
    (_NUMBER_RE, lambda m: _NUMBER_WORDS[m.group(1)]),
    (re.compile(r"\b([a-zA-Z]+)[0-9]\b"), r"\1"),   # "mat2" -> "mat": a digit glued to a word
    # Articles go one at a time, a then an then the: one combined pattern would treat
    # "the a chair" differently from the reference.
    (re.compile(r"\ba\b ([a-zA-Z]+)"), r"\1"),
    (re.compile(r"\ban\b ([a-zA-Z]+)"), r"\1"),
    (re.compile(r"\bthe\b ([a-zA-Z]+)"), r"\1"),
    (re.compile(r"\bbackwards\b"), "backward"),
]


def clean_answer(text: str) -> str:
    """Normalise an answer as the LLaVA-3D/LEO evaluators do (both sides of every comparison)."""
    text = text.lower()
    for pattern, replacement in _CLEANING_STEPS:
        text = pattern.sub(replacement, text)
    return text


def _squeeze(text: str) -> str:
    return "".join(text.split())


def answer_match(prediction: str, references: Sequence[str], style: str = "llava3d") -> tuple[bool, bool]:
    """(EM, refined EM) of one cleaned prediction against its cleaned references.

    Refined EM also accepts a whitespace-free substring match in either direction. The styles differ
    only in EM: "llava3d" first looks for an exact match among all references; "leo" walks the
    references in order and stops at the first one that matches either way, so an earlier
    substring match hides a later exact one (EM false, refined EM true).

    Unlike both references, an empty prediction never matches ("" is a substring of every string,
    so they score it correct), and an empty reference never substring-matches a prediction.
    """
    _check_style(style)
    pred = _squeeze(prediction)
    if not pred:
        return False, False

    def substring_match(reference: str) -> bool:
        ref = _squeeze(reference)
        return bool(ref) and (pred in ref or ref in pred)

    if style == "llava3d":
        if prediction in references:
            return True, True
        return False, any(substring_match(r) for r in references)
    for reference in references:
        if prediction == reference:
            return True, True
        if substring_match(reference):
            return False, True
    return False, False


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Exact match, the one definition every accuracy in adatoken uses: the cleaned prediction equals one
    of the cleaned references (`clean_answer`; "Two." and "2" match), as LLaVA-3D's evaluator scores EM."""
    return answer_match(clean_answer(prediction), [clean_answer(r) for r in references])[0]


def sqa3d_question_type(question: str) -> str:
    """SQA3D question type by how the question starts, as LEO types it (one of SQA3D_TYPES).

    The test is a case-insensitive prefix test, not a word test: "What's ..." is "what", and so
    is "Whatever ...". Situation text must not precede the question.
    """
    start = question.lstrip().lower()
    for qtype in SQA3D_TYPES[:-1]:
        if start.startswith(qtype):
            return qtype
    return "other"


# --- n-gram metrics ----------------------------------------------------------------------------
NGRAM_INSTALL_HINT = 'pip install "adatoken[eval]"'


def require_pycocoevalcap() -> SimpleNamespace:
    """pycocoevalcap's scorers and PTB tokenizer, imported on first use (an optional dependency).

    Raises ImportError naming the `eval` extra when it is missing; a front end that will ask for the
    n-gram metrics can call this before a long run, to fail at once rather than at scoring time.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as exc:
        raise ImportError(
            f"BLEU/ROUGE-L/METEOR/CIDEr need pycocoevalcap, which could not be imported ({exc}); "
            f"install it with: {NGRAM_INSTALL_HINT} (or pass ngram=False for EM and refined EM only)"
        ) from exc
    return SimpleNamespace(Bleu=Bleu, Cider=Cider, Meteor=Meteor, Rouge=Rouge, PTBTokenizer=PTBTokenizer)


def java_missing_reason() -> str | None:
    """Why Java-based tools cannot run here, or None when a `java` executable is on PATH."""
    if shutil.which("java") is None:
        return "java not found on PATH (pycocoevalcap's Java tools need a Java runtime)"
    return None


def _ptb_tokenize(res: dict[int, list[str]], gts: dict[int, list[str]], ptb_tokenizer) -> tuple[dict, dict]:
    """pycocoevalcap's PTBTokenizer over predictions and references in one JVM run (it works line by
    line, so this equals LLaVA-3D's two separate runs)."""
    texts = {(side, k): v for side, d in (("res", res), ("gts", gts)) for k, v in d.items()}
    tokenized = ptb_tokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})
    if tokenized.keys() != texts.keys():  # its output is matched to inputs line by line
        raise RuntimeError("PTBTokenizer returned a different number of lines than it was given")
    return ({k: tokenized[("res", k)] for k in res}, {k: tokenized[("gts", k)] for k in gts})


# METEOR's jar reads one request per line, and Java also ends a line at "\r" and other breaks.
_LINE_BREAKS = re.compile(r"[^\S ]")


def ngram_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                 tokenizer: str = "ptb", meteor: bool = True) -> tuple[dict, dict, dict]:
    """BLEU-1..4, ROUGE-L, METEOR, CIDEr of already-cleaned strings with pycocoevalcap's scorers.

    Returns (corpus scores, per-sample scores, unavailable): every name in NGRAM_METRICS is a key
    of the first two (None where not computed) and `unavailable` maps each missing one to why.
    Raises ImportError when pycocoevalcap is not installed (the `eval` extra).
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: {', '.join(TOKENIZERS)}")
    coco = require_pycocoevalcap()
    corpus = dict.fromkeys(NGRAM_METRICS)
    per_sample = dict.fromkeys(NGRAM_METRICS)
    unavailable: dict[str, str] = {}
    res = {i: [p] for i, p in enumerate(predictions)}
    gts = {i: list(r) for i, r in enumerate(references)}
    if tokenizer == "ptb":
        reason = java_missing_reason()
        if reason is None:
            try:
                res, gts = _ptb_tokenize(res, gts, coco.PTBTokenizer)
            except (OSError, RuntimeError) as exc:  # e.g. it cannot write its temp file next to the jar
                reason = f"it failed: {exc!r}"
        if reason is not None:
            why = f"PTB tokenizer unavailable: {reason}; pass tokenizer='none' to score untokenized text"
            return corpus, per_sample, dict.fromkeys(NGRAM_METRICS, why)
    else:
        res = {i: [_LINE_BREAKS.sub(" ", p) for p in v] for i, v in res.items()}
        gts = {i: [_LINE_BREAKS.sub(" ", r) for r in v] for i, v in gts.items()}

    bleu, bleu_each = coco.Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"bleu_{n + 1}"] = float(bleu[n])
        per_sample[f"bleu_{n + 1}"] = [float(s) for s in bleu_each[n]]
    for name, scorer in (("rouge_l", coco.Rouge()), ("cider", coco.Cider())):
        value, each = scorer.compute_score(gts, res)
        corpus[name], per_sample[name] = float(value), [float(s) for s in each]

    if not meteor:
        unavailable["meteor"] = "not requested (meteor=False)"
    elif (reason := java_missing_reason()) is not None:
        unavailable["meteor"] = reason
    else:
        try:
            value, each = coco.Meteor().compute_score(gts, res)
        except (OSError, ValueError) as exc:  # the JVM failed to start or died mid-way
            unavailable["meteor"] = f"meteor-1.5.jar failed: {exc!r}"
        else:
            corpus["meteor"], per_sample["meteor"] = float(value), [float(s) for s in each]
    return corpus, per_sample, unavailable


# --- the entry point ---------------------------------------------------------------------------
def score(predictions: Sequence[str], references: Sequence[Sequence[str]],
          questions: Sequence[str] | None = None, *, qtypes: Sequence[str | None] | None = None,
          question_ids: Sequence[object] | None = None, style: str = "llava3d",
          tokenizer: str | None = None, ngram: bool = True, meteor: bool = True) -> dict:
    """Score predictions against reference answers; one dict with corpus scores and per-sample rows.

    predictions: one answer string per sample. references: a non-empty list of answers per sample.
    questions: when given (and qtypes is not), each sample is typed with `sqa3d_question_type`.
    qtypes: a type per sample (None for untyped) for the per-type breakdown.
    style: "llava3d" or "leo" (answer matching and the default tokenizer; see `answer_match`).
    tokenizer: "ptb" or "none" before the n-gram scorers; None means the style's default.
    ngram: False skips BLEU/ROUGE-L/METEOR/CIDEr (EM only, as LLaVA-3D scores SQA3D). True needs
        pycocoevalcap (`pip install "adatoken[eval]"`) and raises ImportError without it.
    meteor: False skips only METEOR (its JVM takes seconds to start).
    """
    _check_style(style)
    tokenizer = DEFAULT_TOKENIZER[style] if tokenizer is None else tokenizer
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: {', '.join(TOKENIZERS)} (or None)")
    _check_inputs(predictions, references)
    n = len(predictions)
    for name, values in (("questions", questions), ("qtypes", qtypes), ("question_ids", question_ids)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but there are {n} predictions")
    if qtypes is None and questions is not None:
        qtypes = [sqa3d_question_type(q) for q in questions]

    preds = [clean_answer(p) for p in predictions]
    refs = [[clean_answer(r) for r in rs] for rs in references]
    samples = []
    for i, (pred, rs) in enumerate(zip(preds, refs)):
        em, refined = answer_match(pred, rs, style)
        samples.append({
            "index": i,
            "question_id": None if question_ids is None else question_ids[i],
            "qtype": None if qtypes is None else qtypes[i],
            "prediction": pred,
            "references": rs,
            "em": em,
            "refined_em": refined,
            "empty_prediction": not _squeeze(pred),
            "empty_reference": any(not _squeeze(r) for r in rs),
        })

    if ngram:
        corpus, per_sample, unavailable = ngram_scores(preds, refs, tokenizer=tokenizer, meteor=meteor)
    else:
        corpus, per_sample = dict.fromkeys(NGRAM_METRICS), dict.fromkeys(NGRAM_METRICS)
        unavailable = dict.fromkeys(NGRAM_METRICS, "not requested (ngram=False)")
    for name, values in per_sample.items():
        for row, value in zip(samples, values or [None] * n):
            row[name] = value

    result = {
        "num_samples": n,
        "style": style,
        "tokenizer": tokenizer,
        "em": sum(s["em"] for s in samples) / n,
        "refined_em": sum(s["refined_em"] for s in samples) / n,
        **corpus,
        "unavailable": unavailable,
        "num_empty_predictions": sum(s["empty_prediction"] for s in samples),
        "num_empty_references": sum(s["empty_reference"] for s in samples),
        "by_type": None,
        "samples": samples,
    }
    if qtypes is not None and any(t is not None for t in qtypes):
        # SQA3D tables always show all six types, as the reference evaluators print them.
        sqa3d = all(t in SQA3D_TYPES for t in qtypes if t is not None)
        result["by_type"] = breakdown(samples, types=SQA3D_TYPES if sqa3d else None)
    return result


def score_records(records: Sequence, predictions: Mapping[str, str], **options) -> dict:
    """`score` for dataset records (adatoken.eval.datasets.QARecord) and predictions by question_id."""
    missing = [r.question_id for r in records if r.question_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} records have no prediction "
                         f"(first: {missing[:3]}); predictions are looked up by question_id")
    qtypes = [r.qtype for r in records]
    return score(
        [predictions[r.question_id] for r in records], [r.answers for r in records],
        qtypes=qtypes if any(t is not None for t in qtypes) else None,
        question_ids=[r.question_id for r in records], **options,
    )


def breakdown(samples: Sequence[Mapping], key: str = "qtype",
              types: Sequence[str] | None = None) -> dict[str, dict]:
    """EM and refined EM per value of `key` over score()'s sample rows.

    Rows come in the order of `types` (every one listed, n=0 and None scores when absent), or, when
    types is None, in order of first appearance. Samples whose key is None are left out.
    """
    groups: dict[str, list[Mapping]] = {t: [] for t in types or ()}
    for sample in samples:
        value = sample.get(key)
        if value is not None:
            groups.setdefault(value, []).append(sample)
    table = {}
    for value, rows in groups.items():
        count = len(rows)
        table[value] = {
            "n": count,
            "em": sum(r["em"] for r in rows) / count if count else None,
            "refined_em": sum(r["refined_em"] for r in rows) / count if count else None,
        }
    return table


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists; "
                         "they must pair up one to one")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise ValueError(f"prediction {i} is {type(pred).__name__}, expected a string "
                             "(use \"\" for no answer; it is scored wrong and flagged)")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references {i} is {refs!r}, expected a non-empty list of strings")
