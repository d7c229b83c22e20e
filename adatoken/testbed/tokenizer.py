"""The testbed's word-level tokenizer and its chat layout.

The vocabulary is closed: every word the question templates, class names and answers can produce,
enumerated here, so no word is ever unknown. Text is lowercased and split on whitespace and
punctuation ("lamp?" -> "lamp", "?"); decoding joins words with single spaces.
"""
from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from adatoken.testbed.questions import DESCRIBE, NUMBER_WORDS, SIDE_ASK, SITUATED_ASKS, SITUATION, TEMPLATES
from adatoken.testbed.referring import CLOSEST_TO, COORDINATE_WORDS, DESCRIBE_CLICKED, LOCATION, NEXT_TO, WHERE
from adatoken.testbed.scenes import CLASSES, COLOURS

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SYSTEM_PROMPT = "You see a 3D scene. Answer the question in one or two words."
USER, ASSISTANT = "USER:", "ASSISTANT:"
ANSWER_WORDS = ("yes", "no", "left", "right") + NUMBER_WORDS


def words(text: str) -> list[str]:
    """The tokenizer's split of `text` (lowercased words and punctuation runs)."""
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def _template_words(texts: list[str]) -> set[str]:
    return {w for t in texts for w in words(t.replace("{", " ").replace("}", " "))} - {"x", "xs", "y", "z", "c"}


def vocabulary() -> list[str]:
    """The question-answering words (sorted), then the grounding and captioning words: appended, so a checkpoint
    trained before those tasks existed keeps its token ids and can be fine-tuned on them (train.py)."""
    texts = [SYSTEM_PROMPT, USER, ASSISTANT, DESCRIBE, ",", SITUATION, SIDE_ASK, *SITUATED_ASKS.values(), *ANSWER_WORDS,
             *COLOURS]
    texts += [t for group in TEMPLATES.values() for t in group]
    texts += [name for cls, spec in CLASSES.items() for name in (cls, spec.plural)]
    qa = sorted(_template_words(texts))
    tasks_3d = sorted(_template_words([WHERE, DESCRIBE_CLICKED, CLOSEST_TO, NEXT_TO]) - set(qa))
    return [PAD, UNK, BOS, EOS] + qa + tasks_3d + list(COORDINATE_WORDS) + [LOCATION]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # same split as `words`
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=path, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def system_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Everything before the spatial tokens: BOS and the system prompt."""
    return [tokenizer.bos_token_id] + encode(tokenizer, SYSTEM_PROMPT)


def dialogue_ids(tokenizer: PreTrainedTokenizerFast,
                 turns: list[tuple[str, str | None]]) -> tuple[list[int], list[bool]]:
    """Everything after the spatial tokens: `USER: q ASSISTANT: a </s>` per turn. A last turn whose answer
    is None ends at `ASSISTANT:`, ready to generate. Also returns which ids are answer tokens (the loss)."""
    ids: list[int] = []
    is_answer: list[bool] = []
    for question, answer in turns:
        prompt = encode(tokenizer, f"{USER} {question} {ASSISTANT}")
        ids += prompt
        is_answer += [False] * len(prompt)
        if answer is not None:
            reply = encode(tokenizer, answer) + [tokenizer.eos_token_id]
            ids += reply
            is_answer += [True] * len(reply)
    return ids, is_answer
