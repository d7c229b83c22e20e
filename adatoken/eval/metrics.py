"""Question-answering metrics, computed the way 3D-LMM and VQA papers report them.

EM@1 and refined EM follow the ScanQA/SQA3D evaluators of LLaVA-3D, which took their answer
cleaning and matching from LEO (embodied-generalist). VQA accuracy (image questions with ten human
answers, VQAv2) follows the official VQA evaluator (`vqa_accuracy`). BLEU-1..4, ROUGE-L and CIDEr come from
pycocoevalcap's own scorers; METEOR from pycocoevalcap's meteor-1.5.jar, which needs Java. Where a
metric cannot be computed it is None and `unavailable` says why: never a silent 0.

pycocoevalcap is an optional dependency (`pip install "adatoken[eval]"`), imported only when the
n-gram metrics are computed: EM and refined EM (`ngram=False`) need nothing beyond the standard
library, and asking for the n-gram metrics without it raises an ImportError that says what to install.

All scores are fractions in [0, 1] (CIDEr in [0, 10]); papers print them multiplied by 100.
docs/metrics.md describes every rule here and where the two reference evaluators differ.
"""
from __future__ import annotations

import functools
import re
import shutil
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

__all__ = ["SQA3D_TYPES", "VQA_ANSWER_TYPES", "answer_match", "breakdown", "clean_answer", "exact_match", "score",
           "score_records", "sqa3d_question_type", "vqa_accuracy", "vqa_normalize", "vqa_types"]

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


# --- VQA accuracy ------------------------------------------------------------------------------
# The official evaluator: GT-Vision-Lab/VQA@a013f00 (2021-03-11, its latest),
# PythonEvaluationTools/vqaEvaluation/vqaEval.py. Its tables are copied whole.
VQA_ANSWER_TYPES = ("yes/no", "number", "other")  # VQAv2's answer_type values, in the order papers print them
VQA_NUM_ANSWERS = 10  # human answers per VQAv2 question
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                    "?", "!")
# "(?!<=\d)" is the reference's slip for a look-behind; as written it never blocks a match, so every
# period not followed by a digit goes: "3.5" keeps its point, "dog." and "a.m." lose theirs.
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The reference passes re.UNICODE (32) where sub() takes its count: at most 32 periods are removed.
_VQA_PERIOD_COUNT = 32


def _vqa_strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
    """processPunctuation: a mark next to a space anywhere in the text (or any mark, when the text holds a
    digit-comma-digit such as "1,000") is deleted, otherwise replaced by a space; then the periods go."""
    out = text
    delete_all = _VQA_DIGIT_COMMA.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        # the test reads the original text, not the partly processed one, as the reference does
        out = out.replace(mark, "" if delete_all or mark + " " in text or " " + mark in text else " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def _vqa_digits_articles(text: str) -> str:
    """processDigitArticle: lowercase, split on whitespace, number words 0-10 to digits, drop a/an/the,
    restore contractions ("dont" -> "don't"), join with single spaces. (The table's capitalised keys,
    "Im" and "Ive", never match after lowercasing; kept, as in the reference.)"""
    words = [_VQA_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def vqa_normalize(text: str) -> str:
    """An answer as the official VQA evaluator compares it: tabs and newlines to spaces, stripped, then
    processPunctuation and processDigitArticle. "The dog." -> "dog", "Two" -> "2", "yes!" -> "yes"."""
    return _vqa_digits_articles(_vqa_punctuation(_vqa_strip(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (VQAv2: ten), in [0, 1].

    Each answer is left out in turn; against the other nine the prediction scores min(1, matches / 3);
    the accuracy is the mean of those ten scores. So 3 matching answers give 0.9 (three subsets lose a
    match: 2/3; seven keep three: 1), 2 give 0.6, 1 gives 0.3 and 4 or more give 1.

    Matching compares `vqa_normalize`d strings. The reference normalises only when the human answers
    disagree; when they all agree it compares the stripped prediction with the answer as written, so
    "Yes" against ten "yes" scores 0 there. Here both sides are always normalised (that case scores 1),
    as LLaVA (scripts/convert_vqav2_for_submission.py) and lmms-eval (tasks/vqav2/utils.py) normalise every
    prediction before the reference logic. With disagreeing answers the two are identical.
    """
    if isinstance(answers, str) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers is {answers!r}, expected a non-empty list of strings")
    if not isinstance(prediction, str):
        raise ValueError(f"prediction is {type(prediction).__name__}, expected a string")
    pred = vqa_normalize(prediction)
    hits = [vqa_normalize(a) == pred for a in answers]
    matches = sum(hits)
    # leaving answer i out leaves `matches - hits[i]` matches among the others
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(hits)


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


@functools.lru_cache(maxsize=1)
def _meteor_scorer():
    """One METEOR JVM per process, reused: each start loads its paraphrase tables (10-20 s on a busy 2-core
    machine), and a report scores one corpus per configuration. The jar answers each EVAL line on its own."""
    return require_pycocoevalcap().Meteor()


def _drop_meteor_scorer() -> None:
    """Forget a METEOR JVM that failed; its wrapper holds its lock when a request dies half-way, and would wait
    on it forever when collected."""
    if _meteor_scorer.cache_info().currsize:
        scorer = _meteor_scorer()
        if scorer.lock.locked():
            scorer.lock.release()
        _meteor_scorer.cache_clear()


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
            value, each = _meteor_scorer().compute_score(gts, res)
        except (OSError, ValueError) as exc:  # the JVM failed to start or died mid-way
            _drop_meteor_scorer()
            unavailable["meteor"] = f"meteor-1.5.jar failed: {exc!r}"
        else:
            corpus["meteor"], per_sample["meteor"] = float(value), [float(s) for s in each]
    return corpus, per_sample, unavailable


# --- the entry point ---------------------------------------------------------------------------
def score(predictions: Sequence[str], references: Sequence[Sequence[str]],
          questions: Sequence[str] | None = None, *, qtypes: Sequence[str | None] | None = None,
          question_ids: Sequence[object] | None = None, style: str = "llava3d",
          tokenizer: str | None = None, ngram: bool = True, meteor: bool = True, vqa: bool = False) -> dict:
    """Score predictions against reference answers; one dict with corpus scores and per-sample rows.

    predictions: one answer string per sample. references: a non-empty list of answers per sample.
    questions: when given (and qtypes is not), each sample is typed with `sqa3d_question_type`.
    qtypes: a type per sample (None for untyped) for the per-type breakdown.
    style: "llava3d" or "leo" (answer matching and the default tokenizer; see `answer_match`).
    tokenizer: "ptb" or "none" before the n-gram scorers; None means the style's default.
    ngram: False skips BLEU/ROUGE-L/METEOR/CIDEr (EM only, as LLaVA-3D scores SQA3D). True needs
        pycocoevalcap (`pip install "adatoken[eval]"`) and raises ImportError without it.
    meteor: False skips only METEOR (its JVM takes seconds to start).
    vqa: True also scores `vqa_accuracy` (on the raw strings, with its own normalisation): a "vqa_accuracy"
        key in the result, in every sample row and in every by_type row, whose types then come in
        VQA_ANSWER_TYPES order.
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
    if vqa:
        for row, prediction, answers in zip(samples, predictions, references):
            row["vqa_accuracy"] = vqa_accuracy(prediction, answers)

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
        **({"vqa_accuracy": sum(s["vqa_accuracy"] for s in samples) / n} if vqa else {}),
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
        types = vqa_types(qtypes) if vqa else SQA3D_TYPES if sqa3d else None
        result["by_type"] = breakdown(samples, types=types)
    return result


def vqa_types(qtypes: Sequence[str | None]) -> list[str]:
    """The VQA answer types present, in VQA_ANSWER_TYPES order (any other type after them, as breakdown adds it)."""
    return [t for t in VQA_ANSWER_TYPES if t in set(qtypes)]


def score_records(records: Sequence, predictions: Mapping[str, str], **options) -> dict:
    """`score` for dataset records (adatoken.eval.datasets.QARecord) and predictions by question_id.

    Records a loader marked extra["answer_format"] == "vqa" (vqav2) are also scored with VQA accuracy,
    unless options say vqa=False."""
    missing = [r.question_id for r in records if r.question_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} records have no prediction "
                         f"(first: {missing[:3]}); predictions are looked up by question_id")
    qtypes = [r.qtype for r in records]
    options.setdefault("vqa", bool(records) and all(r.extra.get("answer_format") == "vqa" for r in records))
    return score(
        [predictions[r.question_id] for r in records], [r.answers for r in records],
        qtypes=qtypes if any(t is not None for t in qtypes) else None,
        question_ids=[r.question_id for r in records], **options,
    )


def breakdown(samples: Sequence[Mapping], key: str = "qtype",
              types: Sequence[str] | None = None) -> dict[str, dict]:
    """EM and refined EM (and VQA accuracy, when the rows carry it) per value of `key` over score()'s sample rows.

    Rows come in the order of `types` (every one listed, n=0 and None scores when absent), or, when
    types is None, in order of first appearance. Samples whose key is None are left out.
    """
    vqa = any("vqa_accuracy" in sample for sample in samples)
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
        if vqa:
            table[value]["vqa_accuracy"] = sum(r["vqa_accuracy"] for r in rows) / count if count else None
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
