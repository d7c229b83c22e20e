"""LLaVA-3D's LLM in miniature on its own stack (transformers 4.37.2), and inputs built the way LLaVA-3D's
`prepare_inputs_labels_for_multimodal` builds them. No downloads."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adatoken.core import models

TINY = models.SHAPES["tiny-6l"].config  # the sizes tests/ uses: vocab 96, hidden 64, 6 layers, 4 heads, no GQA
VOCAB = TINY["vocab_size"]
PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX: the one input id the spatial tokens replace


class LlavaLlamaConfig(LlamaConfig):
    model_type = "llava_llama"  # what LLaVA-3D checkpoints declare


class LlavaLlamaForCausalLM(LlamaForCausalLM):
    """LLaVA-3D's LLM as adatoken sees it: a LlamaForCausalLM whose config says llava_llama; its vision
    tower and 3D encoder run before the LLM and hand it `inputs_embeds`."""

    config_class = LlavaLlamaConfig


def build_model(attn: str = "eager", seed: int = 0) -> LlavaLlamaForCausalLM:
    """Vicuna's shape in miniature: multi-head attention (no GQA), 4,096 positions (a full 2,560-token scene)."""
    torch.manual_seed(seed)
    config = LlavaLlamaConfig(**{**TINY, "max_position_embeddings": 4096}, attn_implementation=attn)
    model = LlavaLlamaForCausalLM(config).eval()
    expected = {"eager": "LlamaAttention", "sdpa": "LlamaSdpaAttention"}[attn]  # 4.37 picks the class per layer
    assert type(model.model.layers[0].self_attn).__name__ == expected
    return model


def make_prompt(system: int = 12, prompt: int = 10, seed: int = 0) -> torch.Tensor:
    """input_ids [1, S] as LLaVA-3D tokenizes a question: system | <image> placeholder | prompt."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(1, VOCAB, (system,), generator=g), torch.tensor([PLACEHOLDER]),
                      torch.randint(1, VOCAB, (prompt,), generator=g)])[None]


def llava3d_inputs(model, ids: torch.Tensor, num_spatial: int, seed: int = 0):
    """(inputs_embeds [1, S-1+N, D], spatial mask [1, S-1+N]) for one sample, as LLaVA-3D builds them:
    the placeholder replaced by N 3D patch features; the mask from its position and N."""
    g = torch.Generator().manual_seed(seed + 1)
    at = int((ids[0] == PLACEHOLDER).nonzero())
    text = model.get_input_embeddings()(ids[0].clamp(min=0)).detach()
    features = torch.randn(num_spatial, text.shape[-1], generator=g)
    embeds = torch.cat([text[:at], features, text[at + 1:]])[None]
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    mask[0, at:at + num_spatial] = True
    return embeds, mask
