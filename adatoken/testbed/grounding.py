"""Auxiliary 3D grounding losses for training the testbed: linear heads that read object positions off hidden states.

LLaVA-3D's instruction data includes 3D grounding: the model outputs where the object a text refers to
is. The testbed answers grounding questions with a box in words (referring.py); besides, two linear
regressions used only in training (the shipped model has no heads) each predict an object's floor position (x, y):
- at every word naming an object (the sofa of "What is closest to the sofa?"), read after layer
  `word_layer`: the model learns to fetch *where* an object is, along with what it is;
- at the last prompt token of a relation or situated question whose answer is an object, and of a grounding
  or captioning question (referring.py: the object whose box or caption is the answer), read after layer
  `answer_layer`: the model learns to find the answer object by geometry before it names it.
Why: without them the model fetches an object's colour at its word but not its position (`adatoken testbed
probe` measures both), so questions about geometry cannot be learned; the measured effect on accuracy is in
the README's testbed section, with the commands that give it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from adatoken.testbed.model import scaled_position
from adatoken.testbed.questions import Question, unique_classes
from adatoken.testbed.referring import question_object
from adatoken.testbed.scenes import Scene

GROUNDING_HEADS = ("word", "answer")


def grounding_targets(scene: Scene, visible: set[int], questions: list[Question], ids: list[int],
                      is_answer: list[bool], tokenizer: PreTrainedTokenizerFast
                      ) -> dict[str, tuple[list[int], list[np.ndarray]]]:
    """Per head, dialogue indices and the floor positions to regress there. `ids`/`is_answer` are the dialogue
    of `questions` (in order, possibly followed by more turns) as tokenizer.dialogue_ids builds it. Object
    words are prompt words naming a class that has exactly one object in the scene, a visible one."""
    floor = {o.object_id: scaled_position(o.centre[:2]) for o in scene.objects}  # the centre on the floor plane
    named = {tokenizer.convert_tokens_to_ids(cls): scene.find(cls).object_id for cls in unique_classes(scene)}
    targets = {head: ([], []) for head in GROUNDING_HEADS}
    for i, (token, answer) in enumerate(zip(ids, is_answer, strict=True)):
        if not answer and named.get(token) in visible:
            targets["word"][0].append(i)
            targets["word"][1].append(floor[named[token]])
    # The token before an answer's first token is where the answer is predicted from (the ":" of ASSISTANT:).
    answer_starts = [i for i in range(1, len(ids)) if is_answer[i] and not is_answer[i - 1]]
    for question, start in zip(questions, answer_starts):
        if question.qtype in ("grounding", "captioning"):  # the object whose box or caption is the answer
            targets["answer"][0].append(start - 1)
            targets["answer"][1].append(floor[question_object(question)])
        elif question.qtype in ("relation", "situated") and question.answer not in ("left", "right"):
            targets["answer"][0].append(start - 1)
            targets["answer"][1].append(floor[question.referents[-1]])
    return targets


class GroundingHeads(nn.Module):
    """The two training-only regressions; `loss` takes the LLM's hidden_states and a batch from
    train.training_batch (which adds `<head>_rows`/`<head>_cols`/`<head>_positions` for both heads)."""

    def __init__(self, hidden_size: int, num_layers: int, word_layer: int, answer_layer: int):
        super().__init__()
        self.layers = dict(zip(GROUNDING_HEADS, (word_layer, answer_layer)))
        for name, layer in self.layers.items():
            if not 0 <= layer <= num_layers:  # hidden_states has num_layers + 1 entries, 0 = the embeddings
                raise ValueError(f"the {name} grounding layer must be in 0..{num_layers} (hidden_states index of a "
                                 f"{num_layers}-layer model), got {layer}")
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, 2) for name in self.layers})

    def loss(self, hidden_states: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = {}
        for name, layer in self.layers.items():
            rows, cols = batch[f"{name}_rows"], batch[f"{name}_cols"]
            if len(rows) == 0:  # e.g. a dialogue drew no relation question
                losses[name] = hidden_states[layer].new_zeros(())
                continue
            predicted = self.heads[name](hidden_states[layer][rows, cols])
            losses[name] = nn.functional.mse_loss(predicted, batch[f"{name}_positions"])
        return losses
