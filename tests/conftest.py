"""Tiny random-weight models built from transformers configs (no downloads) and input builders."""
from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

torch.set_num_threads(2)

VOCAB = 96
IMAGE_TOKEN = 95
TEXT_KW = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
               num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
FAMILIES = ["llama", "qwen2", "mistral", "llava"]


def text_config(family: str):
    if family == "llama":
        return LlamaConfig(num_key_value_heads=4, **TEXT_KW)
    if family == "qwen2":  # GQA and q/k/v biases
        return Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **TEXT_KW)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **TEXT_KW)
    raise ValueError(family)


def build_model(family: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    if family == "llava":
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)
        config = LlavaConfig(vision_config=vision, text_config=text_config("llama").to_dict(),
                             image_token_id=IMAGE_TOKEN, vision_feature_layer=-1, projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(config)
    else:
        model = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}[family](text_config(family))
    model.set_attn_implementation(attn)
    return model.eval()


def make_prompt(num_spatial: int, system: int = 5, prompt: int = 7, seed: int = 0, family: str = "llama"):
    """input_ids [1, S] laid out system | spatial | prompt, and the spatial mask."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, IMAGE_TOKEN - 1, (n,), generator=g)  # noqa: E731
    ids = torch.cat([text(system), torch.full((num_spatial,), IMAGE_TOKEN), text(prompt)])[None]
    return ids, ids == IMAGE_TOKEN


def model_inputs(model, family: str, ids: torch.Tensor, attention_mask=None, seed: int = 0):
    """kwargs for model(...) / generate: Llava gets pixel values whose patches fill the image tokens;
    text families get inputs_embeds (the LLaVA-3D way) and must be wrapped in adatoken.spatial_tokens."""
    kwargs = {"attention_mask": attention_mask if attention_mask is not None else torch.ones_like(ids)}
    if family == "llava":
        g = torch.Generator().manual_seed(seed)
        kwargs["input_ids"] = ids
        kwargs["pixel_values"] = torch.randn(ids.shape[0], 3, 16, 16, generator=g)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        embeds = model.get_input_embeddings()(ids).detach()
        spatial = ids == IMAGE_TOKEN
        embeds[spatial] = torch.randn(int(spatial.sum()), embeds.shape[-1], generator=g)
        kwargs["inputs_embeds"] = embeds
    return kwargs


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
