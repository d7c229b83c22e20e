"""`fastv`, `pdrop`, `dart` and `divprune` select exactly what FastV's, PyramidDrop's, DART's and DivPrune's released
code selects: the kept tokens at every stage and the last position's logits, against the literal re-implementations
in reference_baselines.py (batch 1, eager, fp32), on tiny LLaMAs with peaked attention and on the shipped testbed.
DivPrune drops before the LLM; here it drops from layer 1 (the runtime keeps layer 0 whole): the kept set is the
same, and the logits differ by what the kept tokens' layer 0 saw of the dropped ones (measured, not asserted)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adatoken
from adatoken.core import models
from reference_baselines import (
    dart_reference,
    divprune_reference,
    fastv_reference,
    pdrop_decode_positions,
    pdrop_reference,
)
from tiny_models import make_prompt
from tiny_models import model_inputs as tiny_inputs

SYSTEM, NUM_IMAGE = 5, 40


def peaked_llama(seed: int, kv_heads: int = 4):
    """The tests' tiny LLaMA with initializer_range 0.2: attention peaked enough that rankings differ."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**models.SHAPES["tiny-6l"].config, "num_key_value_heads": kv_heads,
                            "initializer_range": 0.2}, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    ids, spatial = make_prompt(NUM_IMAGE, system=SYSTEM, seed=seed)
    return model, tiny_inputs(model, "llama", ids, seed=seed)["inputs_embeds"], spatial


def run_ours(model, embeds, spatial, method: str, **params):
    adatoken.prune(model, method, **params)
    try:
        with torch.no_grad(), adatoken.spatial_tokens(model, spatial):
            logits = model(inputs_embeds=embeds).logits[0, -1]
        return adatoken.last_stats(model).kept_positions, logits
    finally:
        adatoken.unprune(model)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("drop_ratio", [0.5, 0.75])
def test_fastv_equals_the_released_selection(seed, drop_ratio):
    model, embeds, spatial = peaked_llama(seed)
    keep = round(NUM_IMAGE * (1 - drop_ratio))
    with torch.no_grad():
        expected, expected_logits = fastv_reference(model, embeds, SYSTEM, NUM_IMAGE, K=2, keep=keep)
    kept, logits = run_ours(model, embeds, spatial, "fastv", layer=2, drop_ratio=drop_ratio)
    assert all(kept[layer][0] == expected for layer in range(2, 6))
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_pdrop_equals_the_released_selection(seed, kv_heads):
    model, embeds, spatial = peaked_llama(seed, kv_heads)
    ratios = [1.0, 0.5, 0.25, 0.125]
    with torch.no_grad():
        expected, expected_logits = pdrop_reference(model, embeds, SYSTEM, NUM_IMAGE, [2, 3, 4], ratios)
    kept, logits = run_ours(model, embeds, spatial, "pdrop", layers=(2, 3, 4), ratio=0.5)
    assert [kept[layer][0] for layer in (2, 3, 4)] == expected
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


def test_the_variants_select_otherwise():
    """Our variants stay available under their own names and do select other tokens on peaked attention."""
    model, embeds, spatial = peaked_llama(1)
    released = run_ours(model, embeds, spatial, "fastv", layer=2)[0][2][0]
    assert run_ours(model, embeds, spatial, "fastv", layer=2, ranking="own_layer")[0][2][0] != released
    released = run_ours(model, embeds, spatial, "pdrop", layers=(2, 3, 4))[0][4][0]
    variant = run_ours(model, embeds, spatial, "pdrop", layers=(2, 3, 4), scoring="query_key", positions="original")
    assert variant[0][4][0] != released


def test_pdrop_decodes_at_the_released_positions():
    """A decoded token sits, in each layer, right after the tokens that layer holds (positions renumbered),
    as PyramidDrop's decoding lowers it; the cached tokens equal recomputation without a cache."""
    model, embeds, spatial = peaked_llama(2)
    adatoken.prune(model, "pdrop", layers=(2, 3, 4), ratio=0.5)
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.setdefault(i, []).append(kwargs["position_ids"][0, -1].item()),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        with adatoken.spatial_tokens(model, spatial):
            cached = model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=0)
            uncached = model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                      use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(cached, uncached)
    length = embeds.shape[1]
    expected = pdrop_decode_positions(length, NUM_IMAGE, [2, 3, 4], [1.0, 0.5, 0.25, 0.125], 6)
    assert [seen[i][1] for i in range(6)] == expected  # call 0: the prefill, call 1: the first decoded token


def testbed_prompt():
    """The shipped testbed's LLM and one test question's inputs_embeds, spatial mask, and its spatial span."""
    from adatoken import testbed

    model = testbed.load()
    sample = testbed.load_split("test", num_scenes=1, cfg=model.spatial_config)[0]
    inputs = model.build_inputs([sample])
    spatial = inputs["spatial_mask"]
    start, count = int(spatial[0].nonzero()[0]), int(spatial.sum())
    assert spatial[0, start:start + count].all()  # one contiguous span, as the released code assumes
    return model.llm, inputs["inputs_embeds"], spatial, start, count


def test_fastv_and_pdrop_on_the_shipped_testbed():
    llm, embeds, spatial, start, count = testbed_prompt()
    with torch.no_grad():
        expected, expected_logits = fastv_reference(llm, embeds, start, count, K=2, keep=round(count / 2))
    kept, logits = run_ours(llm, embeds, spatial, "fastv", layer=2, drop_ratio=0.5)
    assert kept[2][0] == expected
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected, expected_logits = pdrop_reference(llm, embeds, start, count, [2, 3, 5], [1.0, 0.5, 0.25, 0.125])
    kept, logits = run_ours(llm, embeds, spatial, "pdrop", layers=(2, 3, 5), ratio=0.5)
    assert [kept[layer][0] for layer in (2, 3, 5)] == expected
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_adatoken3d_released_equals_pyramiddrop_machinery(seed):
    """variant="released" is the authors' code: PyramidDrop's rank-and-drop with their stage list and, per stage,
    the fraction of the original tokens its curve gives (junkerman2004/Adatoken-3D modeling_llama_pdrop.py)."""
    model, embeds, spatial = peaked_llama(seed)
    config = adatoken.PruneConfig("adatoken3d", variant="released", stages=(2, 3, 4), final_keep=0.2)
    stage_keep = config.build().schedule(6).meta["stage_keep"]
    with torch.no_grad():
        expected, expected_logits = pdrop_reference(model, embeds, SYSTEM, NUM_IMAGE, [2, 3, 4], [1.0, *stage_keep])
    kept, logits = run_ours(model, embeds, spatial, "adatoken3d", variant="released", stages=(2, 3, 4), final_keep=0.2)
    assert [kept[layer][0] for layer in (2, 3, 4)] == expected
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kv_heads,keep", [(4, 0.5), (2, 0.3)])
def test_dart_equals_the_released_selection(seed, kv_heads, keep):
    model, embeds, spatial = peaked_llama(seed, kv_heads)
    with torch.no_grad():
        expected, expected_logits = dart_reference(model, embeds, SYSTEM, NUM_IMAGE, K=2,
                                                   max_num_trunction=round(NUM_IMAGE * keep))
    kept, logits = run_ours(model, embeds, spatial, "dart", layer=2, keep=keep)
    assert all(kept[layer][0] == expected for layer in range(2, 6))
    assert len(expected) == 4 + 8 * (round(NUM_IMAGE * keep) // 8)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.098, 0.3])
def test_divprune_selects_the_released_set(seed, ratio):
    model, embeds, spatial = peaked_llama(seed)
    with torch.no_grad():
        expected, _ = divprune_reference(model, embeds, SYSTEM, NUM_IMAGE, ratio)
    kept, _ = run_ours(model, embeds, spatial, "divprune", ratio=ratio)
    assert kept[0][0] == list(range(SYSTEM, SYSTEM + NUM_IMAGE))  # layer 0 whole
    assert all(kept[layer][0] == expected for layer in range(1, 6))


def test_dart_and_divprune_on_the_shipped_testbed():
    llm, embeds, spatial, start, count = testbed_prompt()
    with torch.no_grad():
        expected, expected_logits = dart_reference(llm, embeds, start, count, K=2, max_num_trunction=round(count / 4))
    kept, logits = run_ours(llm, embeds, spatial, "dart", layer=2, keep=0.25)
    assert kept[2][0] == expected
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected, _ = divprune_reference(llm, embeds, start, count, 0.2)
    kept, _ = run_ours(llm, embeds, spatial, "divprune", ratio=0.2)
    assert kept[1][0] == expected
