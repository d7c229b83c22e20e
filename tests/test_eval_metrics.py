"""adatoken.eval.metrics: answer cleaning and matching as LLaVA-3D/LEO do it, and the n-gram
scores against pycocoevalcap's own scorers."""
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from adatoken.eval.datasets import QARecord
from adatoken.eval.metrics import (
    NGRAM_METRICS,
    SQA3D_TYPES,
    _meteor_scorer,
    answer_match,
    breakdown,
    clean_answer,
    exact_match,
    score,
    score_records,
    sqa3d_question_type,
)

PREDICTIONS = ["Brown.", "two", "the left side", "TV", ""]
REFERENCES = [["dark brown", "brown"], ["2"], ["on left side of tv"], ["television"], ["yes"]]
# pycocoevalcap's Meteor().compute_score on the cleaned PREDICTIONS/REFERENCES above (no
# tokenizer), run once by hand; recorded so that this suite starts METEOR's JVM only once.
METEOR_CORPUS = 0.2753964798216568
METEOR_EACH = [1.0, 1.0, 0.2796115094764832, 0.0, 0.0]


@pytest.mark.parametrize("raw, cleaned", [
    ("Brown", "brown"),                                   # lowercase
    ("  dark brown  ", "dark brown"),                     # trim
    ("dark    brown", "dark brown"),                      # collapse spaces
    ("brown!? (dark)", "brown dark"),                     # keep letters, digits, , ' - : whitespace
    ("left, it's half-open: yes", "left, it's half-open: yes"),
    ("left .", "left "),                                  # trimmed before the filter, as in the reference
    ("façade o’clock", "faade o'clock"),                  # non-ASCII is dropped, not converted
    ("letf", "left"), ("let", "left"), ("tehre", "there"), ("rigth", "right"), ("rght", "right"),
    ("behine", "behind"), ("chai", "chair"), ("wasing", "washing"), ("waslked", "walked"),
    ("oclock", "o'clock"), ("o'  clock", "o'clock"), ("tv", "TV"),
    ("letter chairs rightly", "letter chairs rightly"),   # typo fixes are whole words only
    ("0", "zero"), ("none", "zero"), ("1", "one"), ("7", "seven"), ("12", "twelve"), ("20", "twenty"),
    ("23", "twenty-three"), ("21", "21"), ("100", "100"),
    ("mat2", "mat"), ("no12", "no12"),                    # one digit glued to a word's end
    ("a chair", "chair"), ("an apple", "apple"), ("the table", "table"), ("the a chair", "chair"),
    ("the 2 chairs", "two chairs"), ("a", "a"),
    ("backwards", "backward"),
])
def test_clean_answer_rules(raw, cleaned):
    assert clean_answer(raw) == cleaned


@pytest.mark.parametrize("prediction, references, expected", [
    ("brown", ["brown", "dark brown"], (True, True)),        # exact
    ("brown", ["dark brown"], (False, True)),                # prediction inside a reference
    ("dark brown chair", ["brown chair"], (False, True)),    # reference inside the prediction
    ("tvstand", ["tv stand"], (False, True)),                # whitespace is ignored
    ("white", ["black"], (False, False)),
    ("", ["yes"], (False, False)),                           # empty: wrong (the references say right)
    ("   ", ["yes"], (False, False)),
    ("chair", ["", "table"], (False, False)),                # an empty reference matches nothing
])
def test_answer_match(prediction, references, expected):
    assert answer_match(prediction, references, "llava3d") == expected
    assert answer_match(prediction, references, "leo") == expected


def test_leo_stops_at_first_substring_match():
    # LLaVA-3D checks for an exact match among all references first; LEO walks them in order.
    assert answer_match("chair", ["brown chair", "chair"], "llava3d") == (True, True)
    assert answer_match("chair", ["brown chair", "chair"], "leo") == (False, True)


def test_unknown_style_names_the_valid_ones():
    with pytest.raises(ValueError, match="llava3d, leo"):
        answer_match("a", ["a"], "scanqa")


@pytest.mark.parametrize("question, qtype", [
    ("What instrument is in front of me?", "what"), ("what's on my left?", "what"),
    ("  Is the door open?", "is"), ("How many sinks?", "how"), ("Can I walk forward?", "can"),
    ("Which direction should I go?", "which"), ("Where is the lamp?", "other"),
    ("Are there chairs?", "other"), ("Island or table?", "is"),  # a prefix test, as LEO's
])
def test_sqa3d_question_type(question, qtype):
    assert sqa3d_question_type(question) == qtype


def test_score_em_flags_and_types():
    result = score(PREDICTIONS, REFERENCES, ["What color?", "How many?", "Where?", "What is it?", "Is it?"],
                   ngram=False, question_ids=["a", "b", "c", "d", "e"])
    assert result["em"] == pytest.approx(2 / 5)          # "brown", "two"
    assert result["refined_em"] == pytest.approx(3 / 5)  # + "left side" inside "on left side of tv"
    assert result["num_empty_predictions"] == 1
    empty = result["samples"][4]
    assert empty["empty_prediction"] and not empty["refined_em"] and empty["question_id"] == "e"
    assert list(result["by_type"]) == list(SQA3D_TYPES)
    assert result["by_type"]["what"] == {"n": 2, "em": 0.5, "refined_em": 0.5}
    assert result["by_type"]["can"] == {"n": 0, "em": None, "refined_em": None}
    assert all(result[m] is None for m in NGRAM_METRICS)
    assert set(result["unavailable"]) == set(NGRAM_METRICS)


def test_punctuation_only_prediction_is_flagged_empty():
    result = score(["?!"], [["yes"]], ngram=False)
    assert result["num_empty_predictions"] == 1 and result["refined_em"] == 0.0


def _pycoco(gts, res):
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"bleu_1": bleu[0], "bleu_2": bleu[1], "bleu_3": bleu[2], "bleu_4": bleu[3],
            "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}


def test_ngram_scores_equal_pycocoevalcap_untokenized():
    result = score(PREDICTIONS, REFERENCES, style="leo", meteor=False)
    assert result["tokenizer"] == "none"
    res = {i: [clean_answer(p)] for i, p in enumerate(PREDICTIONS)}
    gts = {i: [clean_answer(r) for r in rs] for i, rs in enumerate(REFERENCES)}
    for name, value in _pycoco(gts, res).items():
        assert result[name] == pytest.approx(value, abs=1e-12), name


def test_ngram_scores_equal_pycocoevalcap_with_ptb_tokenizer():
    result = score(PREDICTIONS, REFERENCES, style="llava3d", meteor=False)
    assert result["tokenizer"] == "ptb"
    # LLaVA-3D's pipeline: clean, then PTB-tokenize predictions and references separately.
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": clean_answer(p)}] for i, p in enumerate(PREDICTIONS)})
    gts = tokenizer.tokenize({i: [{"caption": clean_answer(r)} for r in rs] for i, rs in enumerate(REFERENCES)})
    for name, value in _pycoco(gts, res).items():
        assert result[name] == pytest.approx(value, abs=1e-12), name
    assert result["samples"][0]["rouge_l"] == pytest.approx(1.0)


@pytest.mark.slow
def test_meteor_runs_the_real_jar():
    result = score(PREDICTIONS, REFERENCES, style="leo")
    assert "meteor" not in result["unavailable"]
    assert result["meteor"] == pytest.approx(METEOR_CORPUS, abs=1e-9)
    assert [s["meteor"] for s in result["samples"]] == pytest.approx(METEOR_EACH, abs=1e-9)
    # one JVM serves every corpus a process scores (a report scores one per configuration), each on its own
    started = _meteor_scorer()
    assert score(PREDICTIONS[:2], REFERENCES[:2], style="leo")["meteor"] != pytest.approx(METEOR_CORPUS)
    again = score(PREDICTIONS, REFERENCES, style="leo")
    assert _meteor_scorer() is started and again["meteor"] == pytest.approx(METEOR_CORPUS, abs=1e-9)


def test_without_java_meteor_and_ptb_are_unavailable_not_zero(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java anywhere on PATH
    untokenized = score(PREDICTIONS, REFERENCES, tokenizer="none")
    assert untokenized["meteor"] is None and "java not found" in untokenized["unavailable"]["meteor"]
    assert isinstance(untokenized["bleu_4"], float)

    ptb = score(PREDICTIONS, REFERENCES)  # llava3d's default tokenizer is PTB, which needs Java too
    assert all(ptb[m] is None for m in NGRAM_METRICS)
    assert "tokenizer='none'" in ptb["unavailable"]["cider"]
    assert ptb["em"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(predictions=["a"], references=[["a"], ["b"]]), "1 predictions but 2 reference lists"),
    (dict(predictions=[None], references=[["a"]]), "prediction 0 is NoneType"),
    (dict(predictions=["a"], references=[[]]), "references 0"),
    (dict(predictions=["a"], references=["a"]), "references 0"),
    (dict(predictions=[], references=[]), "no predictions"),
    (dict(predictions=["a"], references=[["a"]], questions=["q", "r"]), "questions has 2 entries"),
    (dict(predictions=["a"], references=[["a"]], tokenizer="nltk"), "valid: ptb, none"),
    (dict(predictions=["a"], references=[["a"]], style="scanqa"), "valid: llava3d, leo"),
])
def test_score_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        score(**kwargs, ngram=False)


def test_breakdown_by_first_appearance_skips_untyped():
    samples = [{"qtype": "b", "em": True, "refined_em": True}, {"qtype": None, "em": False, "refined_em": False},
               {"qtype": "a", "em": False, "refined_em": True}, {"qtype": "b", "em": False, "refined_em": False}]
    assert breakdown(samples) == {"b": {"n": 2, "em": 0.5, "refined_em": 0.5},
                                  "a": {"n": 1, "em": 0.0, "refined_em": 1.0}}


def test_score_records_looks_predictions_up_by_question_id():
    records = [QARecord("q1", "scene0000_00", "What color?", ["brown"], qtype="what"),
               QARecord("q2", "scene0000_00", "Is it open?", ["yes"], qtype="is")]
    result = score_records(records, {"q2": "Yes.", "q1": "red"}, ngram=False)
    assert [s["em"] for s in result["samples"]] == [False, True]
    assert [s["question_id"] for s in result["samples"]] == ["q1", "q2"]
    assert result["by_type"]["is"]["em"] == 1.0
    with pytest.raises(ValueError, match=r"1 of 2 records have no prediction \(first: \['q2'\]\)"):
        score_records(records, {"q1": "red"}, ngram=False)


def test_exact_match_is_the_cleaned_comparison_every_accuracy_uses():
    """The one EM definition (the testbed's evaluation, its training checks and `adatoken eval` all use it)."""
    assert exact_match("Two.", ["2"]) and exact_match("the chair", ["Chair"]) and exact_match("Left", ["left"])
    assert not exact_match("chair", ["armchair"])  # refined EM's substring match is not EM
    assert not exact_match("", [""]) and not exact_match("red", [])
