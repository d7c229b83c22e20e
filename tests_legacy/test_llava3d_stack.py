"""adatoken on LLaVA-3D's own stack, transformers 4.37.2 (run in .venv-legacy by `make test`).

What differs from transformers 5: decoder layers get `position_ids` only and compute RoPE inside
attention (slicing a cos/sin cache to the number of keys the layer holds), masks are 4-D float masks
built before the layers, the cache is a DynamicCache (legacy tuples inside `generate`) sized from layer
0, and layers return tuples. The core invariants, on LLaVA-3D's prompt layout (system | spatial | prompt).
"""
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache

import adatoken
from adatoken.core import adapters
from invariants import (
    check_counts,
    check_keep_all,
    check_tables_cover_every_method,
    expected_counts,
    greedy_without_cache,
    grid_points,
    kept_spatial,
    pruning,
    top_by_log_attention,
)
from llava3d_models import build_3d_model, build_model, llava3d_inputs, make_prompt, rgbd_scene

NUM_SPATIAL = 300


def forward(model, embeds, spatial, query_index=None, **kwargs):
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial, query_index=query_index, points=grid_points(spatial)):
        return model(inputs_embeds=embeds, **kwargs)


def test_llava3d_model_resolves_to_its_llama_layers():
    adapter = adapters.resolve(build_model())
    assert adapter.model_type == "llava_llama" and adapter.num_layers == 6
    assert len(adapter.attention_rotaries) == 6  # RoPE inside attention: ranked and widened per layer


def test_keep_all_equals_unpruned(attn):
    model = build_model(attn)
    embeds, spatial = llava3d_inputs(model, make_prompt(), NUM_SPATIAL)
    check_keep_all(model, lambda: forward(model, embeds, spatial).logits)


def test_the_tables_cover_every_registered_method():
    check_tables_cover_every_method()


@pytest.mark.parametrize("method,params", pruning())
def test_kept_counts_follow_schedule(method, params, attn):
    model = build_model(attn)
    embeds, spatial = llava3d_inputs(model, make_prompt(), NUM_SPATIAL)
    adatoken.prune(model, method, **params)
    out = forward(model, embeds, spatial, output_hidden_states=True)
    length = embeds.shape[1]
    assert out.logits.shape == (1, length, model.config.vocab_size)
    assert all(h.shape == embeds.shape for h in out.hidden_states)
    check_counts(model, method, params, NUM_SPATIAL, length)


def test_ranking_matches_brute_force_from_attention_weights():
    """Ranked with cos/sin from the layer's own rotary module: the largest Σ_heads q_t·k_j are the largest
    Σ_heads log softmax weights (a per-head constant apart), read from eager attention."""
    model = build_model("eager")
    embeds, spatial = llava3d_inputs(model, make_prompt(), NUM_SPATIAL)
    layer = 2
    with torch.no_grad():
        weights = model(inputs_embeds=embeds, output_attentions=True).attentions[layer][0]  # [H, S, S]
    candidates = spatial[0].nonzero().squeeze(1)
    expected = top_by_log_attention(weights[:, -1], candidates, NUM_SPATIAL // 4)
    adatoken.prune(model, "pdrop", layers=(layer,), ratio=0.25, scoring="query_key", positions="original")
    forward(model, embeds, spatial)
    assert kept_spatial(model, layer) == expected


def _greedy_without_cache(model, embeds, spatial, steps):
    """Each step a full pruned forward of the whole prefix, ranked by the prompt's last token."""
    def extend(tokens):
        new = model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long)).detach()
        return ({"inputs_embeds": torch.cat([embeds, new], 1)},
                torch.cat([spatial, torch.zeros(1, len(tokens), dtype=torch.bool)], 1))

    return greedy_without_cache(model, extend, embeds.shape[1], steps)


@pytest.mark.parametrize("method,params", pruning("fastv", "pdrop", "adatoken3d"))
def test_generate_with_cache_equals_recomputation(method, params, attn):
    model = build_model(attn)
    adatoken.prune(model, method, **params)
    embeds, spatial = llava3d_inputs(model, make_prompt(), NUM_SPATIAL)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial, points=grid_points(spatial)):
        # as LLaVA-3D's generate calls it: inputs_embeds and a mask, greedy (legacy tuple cache inside)
        generated = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(spatial.shape, dtype=torch.long),
                                   max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert adatoken.last_stats(model).spatial_in[-1][0] < NUM_SPATIAL
    assert generated[0, -16:].tolist() == _greedy_without_cache(model, embeds, spatial, 16)


def test_dynamic_cache_decoding_equals_recomputation(attn):
    """A hand-written decoding loop over a DynamicCache object (seen_tokens, get_usable_length)."""
    model = build_model(attn)
    adatoken.prune(model, "adatoken3d", retention=0.4)
    embeds, spatial = llava3d_inputs(model, make_prompt(), NUM_SPATIAL)
    out = forward(model, embeds, spatial, past_key_values=DynamicCache(), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    with torch.no_grad():
        for _ in range(15):
            out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    cache = out.past_key_values
    assert cache.seen_tokens == embeds.shape[1] + 15
    assert cache.get_seq_length(0) == embeds.shape[1] + 15 > cache.get_seq_length(5)  # pruned layers hold less
    assert tokens == _greedy_without_cache(model, embeds, spatial, 16)


def _left_padded(model, counts):
    """Two LLaVA-3D samples (different spatial and prompt lengths), alone and left-padded into one batch."""
    samples = [llava3d_inputs(model, make_prompt(prompt=p, seed=s), n, seed=s) for n, p, s in counts]
    length = max(e.shape[1] for e, _ in samples)
    embeds = torch.zeros(len(samples), length, samples[0][0].shape[-1])
    spatial = torch.zeros(len(samples), length, dtype=torch.bool)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, (e, s) in enumerate(samples):
        embeds[i, length - e.shape[1]:], spatial[i, length - e.shape[1]:], mask[i, length - e.shape[1]:] = e[0], s[0], 1
    return samples, embeds, spatial, mask


@pytest.mark.parametrize("method,params", pruning("pdrop", "adatoken3d"))
def test_padded_batch_equals_samples_alone(method, params, attn):
    model = build_model(attn)
    adatoken.prune(model, method, **params)
    samples, embeds, spatial, mask = _left_padded(model, [(NUM_SPATIAL, 10, 1), (170, 6, 2)])
    alone, alone_counts = [], []
    for e, s in samples:
        alone.append(forward(model, e, s).logits[0, -1])
        alone_counts.append([layer[0] for layer in adatoken.last_stats(model).spatial_in])
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate (and LLaVA-3D with left padding) numbers them
    batched = forward(model, embeds, spatial, attention_mask=mask, position_ids=positions).logits[:, -1]
    for b in range(2):
        torch.testing.assert_close(batched[b], alone[b], atol=1e-4, rtol=0)
    stats = adatoken.last_stats(model)
    assert [[layer[b] for layer in stats.spatial_in] for b in range(2)] == alone_counts


def test_padded_batch_generate_equals_samples_alone(attn):
    model = build_model(attn)
    adatoken.prune(model, "adatoken3d", retention=0.4)
    samples, embeds, spatial, mask = _left_padded(model, [(NUM_SPATIAL, 10, 1), (170, 6, 2)])
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    alone = []
    for e, s in samples:
        with torch.no_grad(), adatoken.spatial_tokens(model, s, points=grid_points(s)):
            alone.append(model.generate(inputs_embeds=e, attention_mask=torch.ones(s.shape, dtype=torch.long),
                                        **settings)[0, -8:].tolist())
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial, points=grid_points(spatial)):
        batched = model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)[:, -8:].tolist()
    assert batched == alone


@pytest.mark.slow
def test_full_scene_of_2560_spatial_tokens():
    """LLaVA-3D's cap: 2,560 spatial tokens, positions far beyond what a pruned layer's cache holds."""
    model = build_model("sdpa")
    adatoken.prune(model, "adatoken3d", retention=0.4)
    embeds, spatial = llava3d_inputs(model, make_prompt(system=35, prompt=20), 2560)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial, points=grid_points(spatial)):
        generated = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(spatial.shape, dtype=torch.long),
                                   max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    counts = [layer[0] for layer in adatoken.last_stats(model).spatial_in]
    assert counts == expected_counts("adatoken3d", {"retention": 0.4}, 6, 2560) and counts[-1] < 2560 // 2
    assert generated[0, -16:].tolist() == _greedy_without_cache(model, embeds, spatial, 16)


def test_generate_prefill_runs_the_lm_head_on_the_last_position_only(attn):
    """transformers 4.37's LlamaForCausalLM computes logits at every position it is handed; inside generate
    the pruned prefill hands it the last one, which is all generate reads. A direct forward keeps them all."""
    model = build_model(attn)
    embeds, spatial = llava3d_inputs(model, make_prompt(), NUM_SPATIAL)
    adatoken.prune(model, "fastv", layer=2, drop_ratio=0.5)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    try:
        with adatoken.spatial_tokens(model, spatial, points=grid_points(spatial)):
            out = model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        direct = forward(model, embeds, spatial).logits
    finally:
        hook.remove()
    assert rows == [1, 1, embeds.shape[1]]
    torch.testing.assert_close(out.scores[0], direct[:, -1], atol=1e-5, rtol=0)


def test_calibration_runs_on_llava3d_stack(tmp_path):
    """analyze -> fit -> prune(schedule) -> generate, all on transformers 4.37.2 (its layers get position_ids, not
    rotary tables: the flow analysis takes them as the layer's attention does). The flow equals a transformers-free
    reading of the same attention: eager attention weights' mass on the spatial tokens from the answer rows."""
    model = build_model("eager")
    samples, answers = [], []
    for seed in range(2):
        ids = make_prompt(seed=seed)
        embeds, spatial = llava3d_inputs(model, ids, NUM_SPATIAL, seed=seed)
        answer = model.get_input_embeddings()(torch.tensor([[5, 9, 13]])).detach()
        query = embeds.shape[1] - 1
        embeds = torch.cat([embeds, answer], 1)
        spatial = torch.cat([spatial, torch.zeros(1, 3, dtype=torch.bool)], 1)
        samples.append(adatoken.FlowSample({"inputs_embeds": embeds}, spatial, query_index=query))
        answers.append((embeds, spatial, query))
    report = adatoken.analyze(model, samples)
    embeds, spatial, query = answers[0]
    with torch.no_grad():
        weights = model(inputs_embeds=embeds, output_attentions=True).attentions  # eager: [1, heads, S, S]
    expected = [float(w[0].mean(0)[query + 1:, spatial[0]].sum(-1).mean()) for w in weights]
    single = adatoken.analyze(model, samples[:1])
    torch.testing.assert_close(torch.tensor(single.s_self, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    schedule = adatoken.fit_schedule(report.inf, report.num_layers, retention=0.5)
    schedule.save(tmp_path / "schedule.json")
    adatoken.prune(model, "adatoken3d", schedule=str(tmp_path / "schedule.json"))
    embeds, spatial = llava3d_inputs(model, make_prompt(seed=7), NUM_SPATIAL, seed=7)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial):
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(spatial.shape, dtype=torch.long),
                             max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 1 + 4  # 4.37 starts what it returns for inputs_embeds with a filled-in BOS
    assert adatoken.last_stats(model).spatial_in[-1][0] < NUM_SPATIAL


def test_bench_runs_on_llava3d_stack(tmp_path, capsys):
    """`adatoken bench` on transformers 4.37.2: its dtype keyword, no logits_to_keep, legacy cache tuples."""
    from adatoken.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "tiny-6l", "--spatial", "48", "--text", "12", "--methods", "fastv", "dart",
                 "--retentions", "0.5", "--new-tokens", "2", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| dart@0.5 |" in table and "| fastv@0.5 |" in table and out.is_file()


def test_a_forgotten_mask_warns_instead_of_running_unpruned_silently():
    """LLaVA-3D's generate hands its LLM inputs_embeds; without adatoken.spatial_tokens nothing marks the
    spatial tokens, and the pruned model says so once (#19 item 6)."""
    model = build_model("sdpa")
    embeds, _ = llava3d_inputs(model, make_prompt(), NUM_SPATIAL)
    adatoken.prune(model, "fastv")
    with pytest.warns(UserWarning, match="found no spatial tokens.*spatial_tokens"), torch.no_grad():
        model(inputs_embeds=embeds)
    assert adatoken.last_stats(model).spatial_in[-1] == [0]


def _scene_batch(model, seeds, prompt_seeds):
    """LLaVA-3D's generate arguments for a batch of scenes: left-padded input_ids with the <image> placeholder."""
    prompts = [make_prompt(seed=s) for s in prompt_seeds]
    width = max(p.shape[1] for p in prompts)
    ids = torch.stack([torch.cat((torch.zeros(width - p.shape[1], dtype=torch.long), p[0])) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - p.shape[1] for p in prompts]).long()
    scenes = [rgbd_scene(s, views=2 + i) for i, s in enumerate(seeds)]  # more views, more voxels
    return dict(inputs=ids, attention_mask=mask, images=[s[0] for s in scenes], depths=[s[1] for s in scenes],
                poses=[s[2] for s in scenes], intrinsics=[s[3] for s in scenes])


@pytest.mark.parametrize("method", ["fastv", "adatoken3d"])
def test_llava3d_own_generate_prunes_as_it_is(method):
    """`adatoken.prune(model)` on a model with LLaVA-3D's interface, then its own generate(input_ids, images=,
    depths=, poses=, intrinsics=): the spatial tokens are found from its input preparation (no mask, no glue),
    a batch of two scenes with different token counts is pruned per sample, and the tokens equal the glue path
    (preparing the inputs by hand and marking them with adatoken.spatial_tokens)."""
    model = build_3d_model()
    batch = _scene_batch(model, seeds=[1, 2], prompt_seeds=[3, 4])
    _, _, new_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
        batch["inputs"], None, batch["attention_mask"], None, None, batch["images"], batch["depths"], batch["poses"],
        batch["intrinsics"])
    counts = [int(len(f)) for f in model.encode_rgbd_videos(batch["images"], batch["depths"], batch["poses"],
                                                            batch["intrinsics"])]
    assert counts[0] != counts[1]
    adatoken.prune(model, method, retention=0.5)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "found no spatial tokens" warning
        warnings.filterwarnings("ignore", message="adatoken3d is running without a fitted schedule")
        out = model.generate(**batch, **greedy)
    stats = adatoken.last_stats(model)
    assert [stats.spatial_in[0][b] for b in range(2)] == counts and all(
        stats.spatial_in[-1][b] < counts[b] for b in range(2))
    spatial = adapters.prepared_spatial_mask(batch["inputs"], batch["attention_mask"], new_mask,
                                                          embeds.shape[1], "left")
    with adatoken.spatial_tokens(model, spatial):
        glued = LlamaForCausalLM.generate(model, inputs_embeds=embeds, attention_mask=new_mask, **greedy)
    assert torch.equal(out, glued)
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        model.generate(inputs_embeds=embeds)


def test_llava3d_forward_needs_no_mask():
    """LLaVA-3D's forward prepares its inputs too (training, scoring): pruned with no hand-built mask."""
    model = build_3d_model()
    batch = _scene_batch(model, seeds=[5], prompt_seeds=[6])
    adatoken.prune(model, "fastv", retention=0.5)
    with torch.no_grad():
        model(input_ids=batch["inputs"], images=batch["images"], depths=batch["depths"], poses=batch["poses"],
              intrinsics=batch["intrinsics"])
    stats = adatoken.last_stats(model)
    assert stats.spatial_in[0][0] > 100 and stats.spatial_in[-1][0] < stats.spatial_in[0][0]


def test_llava3d_calibration_needs_no_mask():
    """analyze on LLaVA-3D's own inputs (scene + question + answer as input_ids with the placeholder, the query
    index counted in input_ids): the same flow as analysing the prepared embeddings with the mask by hand."""
    model = build_3d_model()
    batch = _scene_batch(model, seeds=[7], prompt_seeds=[8])
    ids = torch.cat((batch["inputs"], torch.tensor([[5, 9, 13]])), 1)  # three answer tokens
    query = batch["inputs"].shape[1] - 1
    scene = dict(images=batch["images"], depths=batch["depths"], poses=batch["poses"], intrinsics=batch["intrinsics"])
    report = adatoken.analyze(model, [adatoken.FlowSample(dict(input_ids=ids, **scene), query_index=query)],
                              progress=False)
    _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, **scene)
    spatial = adapters.prepared_spatial_mask(ids, None, None, embeds.shape[1], "left")
    count = int(spatial.sum())
    by_hand = adatoken.analyze(model, [adatoken.FlowSample({"inputs_embeds": embeds}, spatial, query + count - 1)],
                               progress=False)
    assert count > 100 and np.array_equal(report.s_self, by_hand.s_self)
    schedule = adatoken.fit_schedule(report.inf, report.num_layers, retention=0.5)
    adatoken.prune(model, "adatoken3d", schedule=schedule)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 1 and adatoken.last_stats(model).spatial_in[-1][0] < count
