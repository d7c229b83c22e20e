"""Synthetic calibration samples for any decoder: they check a pipeline end to end, and say nothing of a
real model (for a real calibration, build FlowSamples from real questions and answers)."""
from __future__ import annotations

import torch
from torch import nn

from adatoken.calibration.flow import FlowSample


def synthetic_samples(model: nn.Module, count: int, num_spatial: int, seed: int,
                      system: int = 8, prompt: int = 16, answer: int = 4) -> list:
    """`count` samples laid out system | spatial | prompt | answer, as inputs_embeds.

    Text tokens are random vocabulary ids; spatial tokens are the embeddings of random vocabulary ids,
    so they lie in the distribution of the model's input embeddings. The answer follows the last
    prompt token, so λ is the answer's attention, as in the paper.
    """
    if count < 1 or num_spatial < 1:
        raise ValueError(f"need at least one sample and one spatial token, got {count} samples of {num_spatial}")
    embed = model.get_input_embeddings()
    vocab = embed.num_embeddings
    device = embed.weight.device
    generator = torch.Generator().manual_seed(seed)
    length = system + num_spatial + prompt + answer
    samples = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (1, length), generator=generator).to(device)
        spatial = torch.zeros(1, length, dtype=torch.bool, device=device)
        spatial[:, system:system + num_spatial] = True
        with torch.no_grad():
            embeds = embed(ids)
        inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(1, length, dtype=torch.long, device=device)}
        samples.append(FlowSample(inputs, spatial, query_index=system + num_spatial + prompt - 1))
    return samples
