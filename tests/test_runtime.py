"""The runtime's invariants: keep-all == unpruned, counts == schedule, cache == no cache,
padded batch == samples alone, ranking == brute force from eager attention, unprune == never pruned."""
import pytest
import torch

import adatoken
from adatoken.core.runtime import STATE_ATTR, get_state
from invariants import (
    check_counts,
    check_keep_all,
    check_tables_cover_every_method,
    greedy_without_cache,
    kept_spatial,
    pruning,
    top_by_log_attention,
    top_by_mean_attention,
)
from tiny_models import IMAGE_TOKEN, build_model, image_tokens, make_prompt, model_inputs


def spatial_count(family):
    return 16 if family == "llava" else 40  # llava: the 4x4 patch grid of a 16px image


def forward(model, family, ids, attention_mask=None, **extra):
    kwargs = model_inputs(model, family, ids, attention_mask)
    with torch.no_grad(), image_tokens(model, ids):
        return model(**kwargs, **extra)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_equals_unpruned(family, attn):
    model = build_model(family, attn)
    ids, _ = make_prompt(spatial_count(family))
    check_keep_all(model, lambda: forward(model, family, ids).logits)


def test_the_tables_cover_every_registered_method():
    check_tables_cover_every_method()


@pytest.mark.parametrize("method,params", pruning())
def test_kept_counts_follow_schedule(method, params):
    model = build_model("llama")
    ids, _ = make_prompt(40)
    adatoken.prune(model, method, **params)
    out = forward(model, "llama", ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    check_counts(model, method, params, num_spatial=40, length=ids.shape[1])


def _greedy_without_cache(model, family, ids, steps):
    """Each step a full pruned forward of the whole prefix (recomputation, no cache)."""
    kwargs = model_inputs(model, family, ids)

    def extend(tokens):
        new = torch.tensor([tokens], dtype=torch.long).reshape(1, -1)
        out = dict(kwargs, attention_mask=torch.ones(1, ids.shape[1] + len(tokens), dtype=torch.long))
        if family == "llava":
            out["input_ids"] = torch.cat([kwargs["input_ids"], new], 1)
        else:
            out["inputs_embeds"] = torch.cat([kwargs["inputs_embeds"], model.get_input_embeddings()(new)], 1)
        return out, torch.cat([ids == IMAGE_TOKEN, torch.zeros(1, len(tokens), dtype=torch.bool)], 1)

    return greedy_without_cache(model, extend, ids.shape[1], steps)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,params", pruning())
def test_generate_with_cache_equals_recomputation(method, params, attn):
    family = "qwen2" if method in ("pdrop", "random") else "llama"  # both GQA and MHA are covered
    model, ids, kwargs = _pruned(family, attn, method, params)
    with torch.no_grad(), image_tokens(model, ids):
        generated = model.generate(**kwargs, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    cached = generated[0, -16:].tolist()
    assert cached == _greedy_without_cache(model, family, ids, 16)


def test_llava_generate_with_cache_equals_recomputation():
    model, ids, kwargs = _pruned("llava", "sdpa")
    with torch.no_grad():
        generated = model.generate(**kwargs, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    assert generated[0, -16:].tolist() == _greedy_without_cache(model, "llava", ids, 16)


def _pruned(family: str, attn: str, method: str = "adatoken3d", params: dict | None = None):
    """A tiny model of `family` pruned with `method`, a prompt's ids and the model's inputs for it."""
    model = build_model(family, attn)
    adatoken.prune(model, method, **(params or {"retention": 0.5}))
    ids, _ = make_prompt(spatial_count(family))
    return model, ids, model_inputs(model, family, ids)


def test_sampling_generate_runs_and_is_seeded():
    model, ids, kwargs = _pruned("llama", "sdpa")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        with torch.no_grad(), image_tokens(model, ids):
            runs.append(model.generate(**kwargs, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0))
    assert torch.equal(runs[0], runs[1])


def _left_pad(prompts):
    length = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - p.shape[1]:] = p[0]
        mask[i, length - p.shape[1]:] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,params", pruning())
def test_padded_batch_equals_samples_alone(method, params, attn):
    model = build_model("qwen2", attn)
    adatoken.prune(model, method, **params)
    prompts = [make_prompt(40, seed=1)[0], make_prompt(23, prompt=4, seed=2)[0]]
    alone = [forward(model, "qwen2", p).logits[0, -1] for p in prompts]
    alone_counts = []
    for p in prompts:
        forward(model, "qwen2", p)
        alone_counts.append([layer[0] for layer in adatoken.last_stats(model).spatial_in])
    ids, mask = _left_pad(prompts)
    batched = _batched_forward(model, ids, mask, prompts)
    for b in range(2):
        torch.testing.assert_close(batched[b], alone[b], atol=1e-4, rtol=0)
    stats = adatoken.last_stats(model)
    assert [[layer[b] for layer in stats.spatial_in] for b in range(2)] == alone_counts


def _batched_forward(model, ids, mask, prompts):
    # embeddings per sample exactly as they were alone, placed at the same left-padded slots
    rows = []
    for p in prompts:
        rows.append(model_inputs(model, "qwen2", p)["inputs_embeds"][0])
    embeds = torch.zeros(ids.shape[0], ids.shape[1], rows[0].shape[-1])
    for i, row in enumerate(rows):
        embeds[i, ids.shape[1] - row.shape[0]:] = row
    with torch.no_grad(), image_tokens(model, ids):
        return model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]


def test_padded_batch_generate_equals_samples_alone():
    model = build_model("llama", "sdpa")
    adatoken.prune(model, "adatoken3d", retention=0.5)
    prompts = [make_prompt(40, seed=1)[0], make_prompt(23, prompt=4, seed=2)[0]]
    alone = []
    for p in prompts:
        kwargs = model_inputs(model, "llama", p)
        with torch.no_grad(), image_tokens(model, p):
            alone.append(model.generate(**kwargs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                        pad_token_id=0)[0].tolist())
    ids, mask = _left_pad(prompts)
    embeds = torch.zeros(2, ids.shape[1], model.config.hidden_size)
    for i, p in enumerate(prompts):
        embeds[i, ids.shape[1] - p.shape[1]:] = model_inputs(model, "llama", p)["inputs_embeds"][0]
    with torch.no_grad(), image_tokens(model, ids):
        batched = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                 do_sample=False, pad_token_id=0)
    assert batched.tolist() == alone


def test_pruned_forward_equals_manual_reference():
    """FastV at layer K: layers K.. see only the kept tokens, at their original positions."""
    model, spatial, embeds = _model_and_embeds("llama", "eager")
    adatoken.prune(model, "fastv", layer=3, drop_ratio=0.5)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial):
        pruned = model(inputs_embeds=embeds).logits[0, -1]
    kept = torch.tensor(sorted(_text_positions(spatial) | kept_spatial(model, 3)))
    adatoken.unprune(model)
    with torch.no_grad():
        hidden = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[3][:, kept]
        positions = kept[None]
        cos_sin = model.model.rotary_emb(hidden, positions)
        causal = torch.full((len(kept), len(kept)), torch.finfo(torch.float32).min).triu(1)[None, None]
        for layer in model.model.layers[3:]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=cos_sin, position_ids=positions)
        reference = model.lm_head(model.model.norm(hidden))[0, -1]
    assert len(kept) == embeds.shape[1] - 20
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


def _text_positions(spatial) -> set[int]:
    return set((~spatial[0]).nonzero().flatten().tolist())  # never dropped


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ranking_matches_brute_force_from_attention_weights(family):
    """adatoken3d/pdrop keep the spatial tokens with the largest Σ_heads q_t·k_j, which equals
    Σ_heads log softmax weight + const: the brute-force reference from eager attention weights."""
    model, spatial, embeds = _model_and_embeds(family, "eager")
    layer = 2
    with torch.no_grad():
        weights = model(inputs_embeds=embeds, output_attentions=True).attentions[layer][0]  # [H, S, S]
    candidates = spatial[0].nonzero().squeeze(1)
    expected = top_by_log_attention(weights[:, -1], candidates, 10)
    adatoken.prune(model, "pdrop", layers=(layer,), ratio=0.25)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial):
        model(inputs_embeds=embeds)
    assert kept_spatial(model, layer) == expected


@pytest.mark.parametrize("ranking,ranked_layer", [("previous_layer", 1), ("own_layer", 2)])
def test_fastv_ranking_matches_brute_force_from_attention_weights(ranking, ranked_layer):
    """FastV at K = 2 keeps the top spatial tokens of the last token's head-mean attention in layer K-1
    (as released), or in layer K itself (our variant)."""
    model, spatial, embeds = _model_and_embeds("qwen2", "eager")
    with torch.no_grad():
        weights = model(inputs_embeds=embeds, output_attentions=True).attentions[ranked_layer][0]
    candidates = spatial[0].nonzero().squeeze(1)
    expected = top_by_mean_attention(weights[:, -1], candidates, 20)  # the last token's row
    adatoken.prune(model, "fastv", layer=2, drop_ratio=0.5, ranking=ranking)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial):
        model(inputs_embeds=embeds)
    assert kept_spatial(model, 2) == expected


def test_unprune_is_bit_identical_and_prune_replaces():
    model = build_model("llama", "sdpa")
    ids, _ = make_prompt(40)
    reference = forward(model, "llama", ids).logits
    hooks_before = _hook_count(model)
    adatoken.prune(model, "fastv")
    adatoken.prune(model, "adatoken3d", retention=0.5)  # replaces, never stacks
    assert get_state(model).config.method == "adatoken3d"
    # one prune's hooks: two on the model; per decoder layer a pre-hook and a hook, and one on its attention
    # (attention maps at full size)
    assert _hook_count(model) == hooks_before + 3 * model.config.num_hidden_layers + 2
    forward(model, "llama", ids)
    adatoken.unprune(model)
    assert _hook_count(model) == hooks_before
    assert not hasattr(model, STATE_ATTR)
    assert torch.equal(forward(model, "llama", ids).logits, reference)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hidden_states_and_loss_keep_unpruned_shapes_and_backward_works():
    model = build_model("llama", "eager").train()
    ids, spatial = make_prompt(40)
    embeds = model_inputs(model, "llama", ids)["inputs_embeds"]
    adatoken.prune(model, "pdrop", layers=(2, 4), ratio=0.5)
    labels = ids.clone()
    with adatoken.spatial_tokens(model, spatial):
        out = model(inputs_embeds=embeds, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert all(h.shape == (1, ids.shape[1], model.config.hidden_size) for h in out.hidden_states)
    out.loss.backward()
    grads = [p.grad for p in model.model.layers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # dropped tokens keep the hidden state they had when dropped
    kept = _text_positions(spatial) | kept_spatial(model, 2)
    dropped = [i for i in range(ids.shape[1]) if i not in kept]
    torch.testing.assert_close(out.hidden_states[3][0, dropped], out.hidden_states[2][0, dropped])


def test_input_without_spatial_tokens_runs_unpruned():
    model = build_model("llama", "sdpa")
    ids = torch.randint(1, 90, (1, 20))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        adatoken.prune(model, "adatoken3d", retention=0.5)
        with pytest.warns(UserWarning, match="found no spatial tokens in its input, so it ran unpruned"):
            out = model(input_ids=ids).logits  # said, never silent (DESIGN: runtime rules)
    assert torch.equal(out, reference)
    assert all(layer == [0] for layer in adatoken.last_stats(model).spatial_in)


def _model_and_embeds(family: str, attn: str):
    """A tiny text decoder of `family`, and the spatial mask and inputs_embeds of a 40-spatial-token prompt."""
    model = build_model(family, attn)
    ids, spatial = make_prompt(40)
    return model, spatial, model_inputs(model, family, ids)["inputs_embeds"]
