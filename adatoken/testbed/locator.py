"""The testbed's grounding decoder: it points at the spatial tokens of the object a grounding answer's location word
stands for, and the box's x-y centre is read off their points.

LLaVA-3D does not write boxes as text ("outputting 3D bounding boxes directly in text format is challenging", its
docs/fintune_custom_data.md:228): its answer holds a <LOC> token, and a grounding decoder turns that token's hidden
state and the scene's 3D features into a box. The testbed does the same at its scale. A grounding answer is
"loc cz dx dy dz": the location word (referring.LOCATION), then the box's height centre and size as coordinate
words, which the model reads off an object's class well. Where the object is on the floor plane is what a 128-wide
model reads off its tokens only to about 0.3 m in words, while a box needs about 0.1 m (benchmarks/
grounding_ceiling.py); pointing takes the position from the tokens themselves.

The decoder scores each spatial token by a bilinear form of the location word's hidden states at a few layers
(`layers`, hidden_states indices: i is the output of layer i, the last one is after the final norm) and the token's
input embedding, the encoder's output: like LLaVA-3D's decoder, which reads the 3D features, it sees every token
whatever pruning inside the LLM dropped, so pruning changes a box only through the hidden states that ask for it.
Why more than the last state: at the testbed's width the last one carries the object's class but little of what
tells same-class objects apart (on the 32-layer testbed, a linear probe reads the colour a grounding question names
off layer 20's state far better than off the last), and which of two chairs is meant was most of what grounding got
wrong while the decoder read the last state alone (README, the testbed's fine-tunes).

Trained with cross-entropy against the object's tokens (train.py), it answers with the middle of the x-y extent of
the points of the tokens scoring within SELECT_MARGIN of the best that are joined to the best one through such
tokens at most LINK apart: an object's tokens are neighbours, so a second, distant object the pointer is unsure
about does not stretch the box across the room.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

SELECT_MARGIN = math.log(4.0)  # tokens with at least a quarter of the best token's probability make the box
LINK = 0.45  # metres on the floor plane: a little over two 0.2 m voxels, so one missing voxel does not split an object


class Locator(nn.Module):
    def __init__(self, hidden_size: int, layers: Sequence[int], key_size: int = 64):
        super().__init__()
        self.layers = tuple(layers)
        self.query = nn.Linear(hidden_size * len(self.layers), key_size)
        self.key = nn.Linear(hidden_size, key_size)

    def read(self, hidden_states: Sequence[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The location states [Q, len(layers) * H] at (`rows`, `cols`) of a forward's `hidden_states`."""
        return torch.cat([hidden_states[layer][rows, cols] for layer in self.layers], -1)

    def scores(self, state: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [Q, T] of `tokens` [Q, T, H] (input embeddings; `mask` [Q, T] marks the spatial ones) for the
        location states [Q, len(layers) * H] (`read`); -inf off the mask."""
        logits = torch.einsum("qk,qtk->qt", self.query(state), self.key(tokens)) / math.sqrt(self.query.out_features)
        return logits.masked_fill(~mask, float("-inf"))

    def loss(self, state: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the uniform distribution over each location's object tokens (`target` [Q, T])."""
        log_probs = torch.log_softmax(self.scores(state, tokens, mask), -1)
        wanted = target.float() / target.sum(-1, keepdim=True)
        return -(wanted * log_probs.masked_fill(~mask, 0.0)).sum(-1).mean()

    @torch.no_grad()
    def centre(self, state: torch.Tensor, tokens: torch.Tensor, points: torch.Tensor) -> tuple[float, float]:
        """The x-y centre one location state [len(layers) * H] points at, among a scene's spatial tokens [T, H] at
        `points` [T, 3]."""
        logits = self.scores(state[None], tokens[None], torch.ones(1, len(tokens), dtype=torch.bool))[0]
        chosen = logits >= logits.max() - SELECT_MARGIN
        linked = torch.cdist(points[:, :2], points[:, :2]) <= LINK
        cluster = torch.zeros_like(chosen)
        cluster[logits.argmax()] = True
        while True:  # grow from the best token through chosen neighbours
            grown = cluster | (linked[cluster].any(0) & chosen)
            if torch.equal(grown, cluster):
                break
            cluster = grown
        box = points[cluster]
        middle = (box.min(0).values + box.max(0).values) / 2
        return float(middle[0]), float(middle[1])
