"""Calibration samples built for a model: synthetic ones, which check a pipeline end to end and say nothing of a
real model, and `answered_sample`, one real question with its reference answer, from a model's own processor."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def answered_sample(prompt: Mapping[str, torch.Tensor], answer_ids: Sequence[int],
                    spatial_token_ids: Sequence[int], name: str = "question") -> FlowSample:
    """One question's calibration sample: `prompt` is a processor's output for it alone (input_ids with the image
    tokens expanded, attention_mask, pixel values, ...), `answer_ids` its reference answer's token ids.

    The answer goes after the prompt's last token, which becomes query_index, so λ is the answer's attention as
    in the paper. The spatial tokens are where input_ids hold one of `spatial_token_ids` (the model config's
    image/video token ids). The answer is appended as ids, not as text: joined as text it can fuse with the
    prompt's last token ("ASSISTANT:red" is one unknown word to a whitespace tokenizer, and a BPE may merge
    across the seam), and then the prompt would no longer be the one the model answers.
    """
    ids = prompt["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"answered_sample takes one question's inputs, got a batch of {ids.shape[0]}")
    if len(answer_ids) == 0:
        raise ValueError(f"{name}: its reference answer tokenizes to no tokens; calibration needs an answer to "
                         "measure the answer's attention")
    spatial_ids = torch.tensor(list(spatial_token_ids), dtype=ids.dtype, device=ids.device)
    if not bool(torch.isin(ids, spatial_ids).any()):
        raise ValueError(f"{name}: its prompt holds no spatial token (ids {list(spatial_token_ids)}); the "
                         "processor put no image tokens in it")
    answer = torch.tensor([list(answer_ids)], dtype=ids.dtype, device=ids.device)
    inputs = {}
    for key, value in prompt.items():
        if torch.is_tensor(value) and value.shape == ids.shape:  # one entry per token: extend over the answer
            # the answer's tokens are real (mask 1) text tokens (type 0, as Qwen2-VL's mm_token_type_ids has it)
            fill = answer if key == "input_ids" else torch.full_like(answer, int(key == "attention_mask"),
                                                                     dtype=value.dtype)
            value = torch.cat([value, fill], 1)
        inputs[key] = value
    return FlowSample(inputs, torch.isin(inputs["input_ids"], spatial_ids), query_index=ids.shape[1] - 1)
