"""The model families of docs/families.md, each on a tiny random config, eager and sdpa: keep-all ==
unpruned, kept counts == schedule, KV-cache greedy decoding == recomputation without a cache, and the
ranking == brute force from eager attention where a family changes what the ranking computes.

LLaVA-NeXT, LLaVA-OneVision (Qwen2 inside), Qwen2-VL and Qwen2.5-VL (multimodal RoPE) get real pixels,
and their spatial tokens (images and videos) are found from the token ids in their configs. Qwen3 (q/k
norms) is a text decoder fed `inputs_embeds` with an explicit spatial mask, the LLaVA-3D way. The counts
and cache tests also run the core families wherever test_runtime.py leaves an attention implementation
out, so every cell of the support table in docs/families.md names its tests.
"""
import contextlib

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import adatoken
from invariants import (
    FAMILY_METHOD,
    PRUNING,
    check_counts,
    check_keep_all,
    greedy_without_cache,
    kept_spatial,
    top_by_log_attention,
    top_by_mean_attention,
)
from tiny_models import FAMILIES as CORE_FAMILIES  # test_runtime.py's
from tiny_models import (
    IMAGE_TOKEN,
    TEXT_KW,
    VIDEO_TOKEN,
    VISION_END,
    VISION_FAMILIES,
    VISION_START,
    build_model,
    make_prompt,
    model_inputs,
    vision_inputs,
)

FAMILIES = VISION_FAMILIES + ["qwen3"]
FOUND_BY_ID = VISION_FAMILIES + ["llava"]  # the rest are text decoders, told where the spatial tokens are
SPATIAL_IDS = torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])
PLACEHOLDERS = [VISION_END, VISION_START, VIDEO_TOKEN, IMAGE_TOKEN]  # never generated: they would need pixels


def inputs(model, family) -> dict:
    if family in VISION_FAMILIES:
        return vision_inputs(family)
    ids, _ = make_prompt(16 if family == "llava" else 40)  # llava: the 4x4 patch grid of a 16px image
    return {"input_ids": ids, **model_inputs(model, family, ids)}


def spatial_of(kwargs) -> torch.Tensor:
    return torch.isin(kwargs["input_ids"], SPATIAL_IDS)


def marking(model, family, kwargs):
    """Multimodal families find their spatial tokens from input ids; a text decoder is told."""
    if family in FOUND_BY_ID:
        return contextlib.nullcontext()
    return adatoken.spatial_tokens(model, spatial_of(kwargs))


def call_kwargs(family, kwargs) -> dict:
    return kwargs if family in FOUND_BY_ID else {k: v for k, v in kwargs.items() if k != "input_ids"}


def forward(model, family, kwargs):
    with torch.no_grad(), marking(model, family, kwargs):
        return model(**call_kwargs(family, kwargs))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_unpruned(family, attn):
    model = build_model(family, attn)
    kwargs = inputs(model, family)
    check_keep_all(model, lambda: forward(model, family, kwargs).logits)


def test_every_family_counts_with_a_method_and_every_method_on_a_family():
    assert set(FAMILY_METHOD) == set(CORE_FAMILIES + FAMILIES)
    assert all(method in FAMILY_METHOD.values() for method in PRUNING)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,method", [pytest.param(f, m, id=f"{f}-{m}") for f, m in FAMILY_METHOD.items()])
def test_kept_counts_follow_schedule(family, method, attn):
    params = PRUNING[method]
    model = build_model(family, attn)
    kwargs = inputs(model, family)
    adatoken.prune(model, method, **params)
    out = forward(model, family, kwargs)
    length = kwargs["input_ids"].shape[1]
    assert out.logits.shape[:2] == (1, length)
    num_spatial = int(spatial_of(kwargs).sum())  # images and videos alike
    check_counts(model, method, params, num_spatial, length)


def _extend(model, family, kwargs, tokens):
    """The prompt followed by `tokens`, as one uncached forward's inputs."""
    new = torch.tensor([tokens], dtype=torch.long).reshape(1, -1)
    out = dict(kwargs, input_ids=torch.cat([kwargs["input_ids"], new], 1),
               attention_mask=torch.ones(1, kwargs["input_ids"].shape[1] + len(tokens), dtype=torch.long))
    if "mm_token_type_ids" in kwargs:
        out["mm_token_type_ids"] = torch.cat([kwargs["mm_token_type_ids"], torch.zeros_like(new, dtype=torch.int)], 1)
    if "inputs_embeds" in kwargs:
        out["inputs_embeds"] = torch.cat([kwargs["inputs_embeds"], model.get_input_embeddings()(new)], 1)
    return out


def _greedy_without_cache(model, family, kwargs, steps):
    """Each step a full pruned forward of the whole prefix, ranked by the prompt's last token."""
    def extend(tokens):
        extended = _extend(model, family, kwargs, tokens)
        return call_kwargs(family, extended), spatial_of(extended)

    return greedy_without_cache(model, extend, kwargs["input_ids"].shape[1], steps, banned=PLACEHOLDERS)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES + ["mistral", "llava"])
def test_generate_with_cache_equals_recomputation(family, attn):
    model = build_model(family, attn)
    if (family, attn) == ("qwen3", "eager"):  # fastv: the other ranking, projecting keys through the k norm itself
        adatoken.prune(model, "fastv", layer=2)
    else:
        adatoken.prune(model, "adatoken3d", retention=0.5)
    kwargs = inputs(model, family)
    with torch.no_grad(), marking(model, family, kwargs):
        generated = model.generate(**call_kwargs(family, kwargs), max_new_tokens=16, min_new_tokens=16,
                                   do_sample=False, pad_token_id=0, suppress_tokens=PLACEHOLDERS)
    assert adatoken.last_stats(model).spatial_in[-1][0] < int(spatial_of(kwargs).sum())  # it did prune
    assert generated[0, -16:].tolist() == _greedy_without_cache(model, family, kwargs, 16)


@pytest.mark.parametrize("family", FAMILIES + ["qwen2", "mistral"])
def test_static_cache_equals_the_dynamic_cache(family):
    """Every family of the support table decodes from a static KV cache as from the dynamic one (sdpa; eager
    and the LLaVA / LLaMA rows: tests/test_generate.py)."""
    model = build_model(family, "sdpa")
    adatoken.prune(model, "fastv", layer=2)
    kwargs = inputs(model, family)
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, suppress_tokens=PLACEHOLDERS)
    with torch.no_grad(), marking(model, family, kwargs):
        dynamic = model.generate(**call_kwargs(family, kwargs), **greedy)
        static = model.generate(**call_kwargs(family, kwargs), cache_implementation="static", **greedy)
    assert adatoken.last_stats(model).spatial_in[-1][0] < int(spatial_of(kwargs).sum())
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_vl_padded_batch_equals_samples_alone(attn):
    """Left padding shifts Qwen2-VL's 3-D positions per sample (get_rope_index skips the padding)."""
    model = build_model("qwen2_vl", attn)
    adatoken.prune(model, "adatoken3d", retention=0.5)
    samples = [vision_inputs("qwen2_vl", seed=1), vision_inputs("qwen2_vl", seed=2, prompt=3)]
    alone = [forward(model, "qwen2_vl", kwargs).logits[0, -1] for kwargs in samples]
    length = max(kwargs["input_ids"].shape[1] for kwargs in samples)
    pad = lambda t: torch.nn.functional.pad(t, (length - t.shape[1], 0))  # noqa: E731  left, with zeros
    batch = {key: torch.cat([pad(kwargs[key]) for kwargs in samples])
             for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch.update({key: torch.cat([kwargs[key] for kwargs in samples])
                  for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")})
    batched = forward(model, "qwen2_vl", batch).logits[:, -1]
    for b in range(2):
        torch.testing.assert_close(batched[b], alone[b], atol=1e-4, rtol=0)


def _attention_rows(model, family, kwargs, layer):
    """The prompt's last row of eager attention weights at `layer`, [heads, seq]."""
    with torch.no_grad():
        return model(**call_kwargs(family, kwargs), output_attentions=True).attentions[layer][0][:, -1]


@pytest.mark.parametrize("family", ["qwen3", "qwen2_vl"])
def test_query_key_ranking_matches_brute_force(family):
    """Σ_heads q_t·k_j, with Qwen3's k norm (no fold) or Qwen2-VL's multimodal RoPE, ranks as the log
    attention weights summed over heads do (they differ by a per-head constant)."""
    model = build_model(family, "eager")
    kwargs = inputs(model, family)
    layer = 2
    candidates = spatial_of(kwargs)[0].nonzero().squeeze(1)
    keep = len(candidates) // 4
    expected = top_by_log_attention(_attention_rows(model, family, kwargs, layer), candidates, keep)
    adatoken.prune(model, "pdrop", layers=(layer,), ratio=keep / len(candidates), scoring="query_key",
                   positions="original")
    forward(model, family, kwargs)
    assert kept_spatial(model, layer) == expected


def test_fastv_ranking_with_qk_norms_matches_brute_force():
    """FastV at K = 2 ranks by layer K-1's attention (as released), through Qwen3's q/k norms."""
    model = build_model("qwen3", "eager")
    kwargs = inputs(model, "qwen3")
    candidates = spatial_of(kwargs)[0].nonzero().squeeze(1)
    expected = top_by_mean_attention(_attention_rows(model, "qwen3", kwargs, 1), candidates, 20)
    adatoken.prune(model, "fastv", layer=2, drop_ratio=0.5)
    forward(model, "qwen3", kwargs)
    assert kept_spatial(model, 2) == expected


def test_unsupported_family_says_why_and_lists_supported_ones():
    text = {**TEXT_KW, "num_key_value_heads": 2, "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=2,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision))
    with pytest.raises(ValueError, match="does not support model family 'qwen3_vl': DeepStack .*known families: "
                                         "llama, .*llava_next, llava_onevision, qwen2_5_vl, qwen2_vl"):
        adatoken.prune(model, "adatoken3d")
