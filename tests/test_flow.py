"""Flow analysis: the group reduction by hand, the chunked recomputation against eager attention
weights (and sdpa), eqs. 1–4 by hand, the report's JSON round trip, a fitted schedule driving the
runtime, and the single-layer sensitivity sweep."""
import math

import numpy as np
import pytest
import torch

import adatoken
from adatoken.calibration.fit import fit_schedule
from adatoken.calibration.flow import (
    ANSWER,
    PROMPT,
    SPATIAL,
    SYSTEM,
    FlowParams,
    FlowReport,
    FlowSample,
    analyze,
    information_contribution,
    reduce_chunk,
)
from adatoken.calibration.sweep import SweepResult, default_layers, sweep
from adatoken.core.runtime import STATE_ATTR, is_pruned
from tiny_models import (
    NUM_ANSWER,
    NUM_PROMPT,
    NUM_SPATIAL,
    NUM_SYSTEM,
    build_model,
    flow_sample,
    make_prompt,
    model_inputs,
)


def test_reduce_chunk_on_hand_built_attention():
    # positions: system | spatial spatial | prompt | answer answer
    groups = torch.tensor([[SYSTEM, SPATIAL, SPATIAL, PROMPT, ANSWER, ANSWER]])
    weights = torch.tensor([
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.4, 0.0, 0.0],
        [0.1, 0.1, 0.1, 0.2, 0.5, 0.0],
        [0.0, 0.2, 0.2, 0.2, 0.2, 0.2],
    ])
    # two heads whose mean is `weights`
    heads = torch.stack([weights * 0.5, weights * 1.5])[None]
    sums, lambda_sums = reduce_chunk(heads, groups, groups, lambda_rows=groups == ANSWER)
    counts = torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    mass = (sums / counts[:, None])[0]
    expected = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],                          # system -> system
        [(0.5 + 0.2) / 2, (0.5 + 0.8) / 2, 0.0, 0.0],  # spatial rows: 0.5|0.5 and 0.2|0.8
        [0.1, 0.5, 0.4, 0.0],
        [0.05, (0.2 + 0.4) / 2, 0.2, (0.5 + 0.4) / 2],
    ], dtype=torch.float64)
    torch.testing.assert_close(mass, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(mass.sum(1), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(lambda_sums[0], torch.tensor([0.1, 0.3, 0.3, 0.4, 0.7, 0.2]), atol=1e-6, rtol=0)


def _reference_from_eager(model, sample):
    """Group matrix [L, G, G] and λ [L, n_spatial] straight from output_attentions (one sample)."""
    groups = torch.tensor([SYSTEM] * NUM_SYSTEM + [SPATIAL] * NUM_SPATIAL + [PROMPT] * NUM_PROMPT
                          + [ANSWER] * NUM_ANSWER)
    with torch.no_grad():
        attentions = model(**sample.inputs, output_attentions=True).attentions
    mass, lam = [], []
    for layer in attentions:
        probs = layer[0].double().mean(0)  # [S, S], mean over heads
        mass.append([[probs[groups == q][:, groups == k].sum(1).mean().item() for k in range(4)] for q in range(4)])
        lam.append(probs[groups == ANSWER][:, groups == SPATIAL].mean(0).numpy())
    return np.array(mass), np.stack(lam)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_chunked_recomputation_equals_eager_attention(family):
    eager = build_model(family, "eager")
    sample = flow_sample(eager, family)
    mass, lam = _reference_from_eager(eager, sample)
    sdpa = build_model(family, "sdpa")  # same seed: same weights
    for model, chunk in [(eager, 7), (eager, 1000), (sdpa, 13)]:  # 7 and 13 do not divide the 58 tokens
        report = analyze(model, [sample], chunk_size=chunk, keep_token_lambda=True, progress=False)
        np.testing.assert_allclose(report.group_attention, mass, atol=1e-5, rtol=0)
        np.testing.assert_allclose(report.token_lambda[0], lam, atol=1e-5, rtol=0)
        np.testing.assert_allclose(report.group_attention.sum(-1), np.ones((6, 4)), atol=1e-5, rtol=0)
        np.testing.assert_allclose(report.s_self, lam.sum(1), atol=1e-5, rtol=0)


def test_llava_spatial_tokens_found_from_the_image_token_id():
    model = build_model("llava", "eager")
    ids, spatial = make_prompt(16)  # the 4x4 patch grid of a 16px image
    inputs = model_inputs(model, "llava", ids)
    report = analyze(model, [FlowSample(inputs)], chunk_size=5, keep_token_lambda=True, progress=False)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    last_row = np.stack([layer[0].mean(0)[-1][spatial[0]].numpy() for layer in attentions])  # no answer: query row
    np.testing.assert_allclose(report.token_lambda[0], last_row, atol=1e-5, rtol=0)
    np.testing.assert_allclose(report.group_tokens, [5, 16, 7, 0])


def test_padded_batch_rows_equal_samples_alone():
    model = build_model("qwen2", "sdpa")
    long, short = flow_sample(model, "qwen2", seed=1), flow_sample(model, "qwen2", seed=2)
    pad = 3
    short.inputs["inputs_embeds"] = short.inputs["inputs_embeds"][:, pad:]  # 3 fewer system tokens
    short.spatial_mask = short.spatial_mask[:, pad:]
    short.query_index -= pad
    short.inputs["attention_mask"] = torch.ones(1, short.spatial_mask.shape[1], dtype=torch.long)
    alone = [analyze(model, [s], keep_token_lambda=True, progress=False) for s in (long, short)]

    embeds = torch.cat([long.inputs["inputs_embeds"],
                        torch.nn.functional.pad(short.inputs["inputs_embeds"], (0, 0, pad, 0))])
    mask = torch.ones(2, embeds.shape[1], dtype=torch.long)
    mask[1, :pad] = 0
    spatial = torch.cat([long.spatial_mask, torch.nn.functional.pad(short.spatial_mask, (pad, 0))])
    # left padding shifts the short row's positions; give it the same positions as alone
    positions = torch.stack([torch.arange(embeds.shape[1]), (torch.arange(embeds.shape[1]) - pad).clamp(min=0)])
    batch = FlowSample({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}, spatial,
                       [long.query_index, long.query_index])
    report = analyze(model, [batch], chunk_size=16, keep_token_lambda=True, progress=False)
    for b in range(2):
        np.testing.assert_allclose(report.token_lambda[b], alone[b].token_lambda[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(report.group_attention, (alone[0].group_attention + alone[1].group_attention) / 2,
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(report.group_tokens, [NUM_SYSTEM - pad / 2, NUM_SPATIAL, NUM_PROMPT, NUM_ANSWER])


def test_equations_by_hand():
    s_self, prompt_to_spatial, spatial_to_system = [0.5, 0.2, 0.4], [0.4, 0.1, 0.3], [0.2, 0.6, 0.0]
    terms = information_contribution(s_self, prompt_to_spatial, spatial_to_system)  # σ=γ=a1=a2=.5, ε=α=1
    f3d = [0.5, 0.5 * 0.2 + 0.5 * 0.5, 0.5 * 0.4 + 0.5 * 0.35]
    s_cross = [0.3, 0.35, 0.15]
    np.testing.assert_allclose(terms["f3d"], f3d)
    np.testing.assert_allclose(terms["s_cross"], s_cross)
    np.testing.assert_allclose(terms["inf"], [math.exp(c) + f + math.log(1 + s)
                                              for c, f, s in zip(s_cross, f3d, s_self)])

    params = FlowParams(sigma=1.0, gamma=0.25, a1=2.0, a2=0.0, epsilon=0.5, alpha=(1.0, 2.0, 3.0))
    terms = information_contribution(s_self, prompt_to_spatial, spatial_to_system, params)
    f3d = [0.5, 0.2 + 0.25 * 0.5, 0.4 + 0.25 * 0.325]
    s_cross = [0.8, 0.2, 0.6]
    np.testing.assert_allclose(terms["f3d"], f3d)
    np.testing.assert_allclose(terms["inf"], [math.exp(c / 0.5) + a * f + math.log(1 + s)
                                              for c, a, f, s in zip(s_cross, (1, 2, 3), f3d, s_self)])


def test_report_statistics_and_json_round_trip(tmp_path):
    model = build_model("llama", "sdpa")
    samples = [flow_sample(model, "llama", seed=0), flow_sample(model, "llama", seed=1, answer=False)]
    report = analyze(model, samples, keep_token_lambda=True, progress=False)
    # eq. 1 from λ; redundancy from its definition (λ under 5 % of the sample's mean spatial λ)
    np.testing.assert_allclose(report.s_self, np.mean([t.sum(1) for t in report.token_lambda], 0))
    shares = [(t < 0.05 * t.mean(1, keepdims=True)).mean(1) for t in report.token_lambda]
    np.testing.assert_allclose(report.redundant_share, np.mean(shares, 0))
    assert report.redundancy == pytest.approx(float(np.mean(shares)))

    def low_mass(lam_row):  # the mass reading, counted token by token from the least attended
        total, running, count = lam_row.sum(), 0.0, 0
        for value in sorted(lam_row):
            running += value
            if running >= 0.05 * total:
                break
            count += 1
        return count / len(lam_row)

    mass = [[low_mass(row) for row in t] for t in report.token_lambda]
    np.testing.assert_allclose(report.lambda_stats["low_mass_share"], np.mean(mass, 0))
    assert report.redundancy_mass == pytest.approx(float(np.mean(mass)))
    assert report.model["num_layers"] == 6 and len(report.inf) == 6

    report.save(tmp_path / "flow.json")
    loaded = FlowReport.load(tmp_path / "flow.json")
    assert loaded.params == report.params and loaded.model == report.model and loaded.num_samples == 2
    for name in ("group_tokens", "group_attention", "s_self", "f3d", "s_cross", "inf"):
        np.testing.assert_allclose(getattr(loaded, name), getattr(report, name))
    for name in report.lambda_stats:
        np.testing.assert_allclose(loaded.lambda_stats[name], report.lambda_stats[name])
    for a, b in zip(loaded.token_lambda, report.token_lambda):
        np.testing.assert_allclose(a, b)

    without_answers = analyze(model, samples[1:], progress=False)  # the answer row is absent: null in JSON
    without_answers.save(tmp_path / "no_answer.json")
    assert np.isnan(FlowReport.load(tmp_path / "no_answer.json").group_attention[:, ANSWER]).all()
    assert FlowReport.load(tmp_path / "no_answer.json").token_lambda is None


def test_fitted_schedule_drives_adatoken3d(tmp_path):
    model = build_model("llama", "sdpa")
    sample = flow_sample(model, "llama")
    report = analyze(model, [sample], progress=False)
    schedule = fit_schedule(report.inf, report.num_layers, retention=0.5)
    schedule.save(tmp_path / "schedule.json")
    adatoken.prune(model, "adatoken3d", schedule=str(tmp_path / "schedule.json"))
    with torch.no_grad(), adatoken.spatial_tokens(model, sample.spatial_mask, query_index=sample.query_index):
        model(**sample.inputs)
    kept = [layer[0] for layer in adatoken.last_stats(model).spatial_in]
    assert kept == schedule.counts(NUM_SPATIAL)
    assert kept[-1] < NUM_SPATIAL
    with pytest.raises(ValueError, match="unprune"):
        analyze(model, [sample], progress=False)
    adatoken.unprune(model)


def test_invalid_samples_raise_clear_errors():
    model = build_model("llama", "sdpa")
    sample = flow_sample(model, "llama")
    with pytest.raises(ValueError, match="chunk_size"):
        analyze(model, [sample], chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="after every spatial token"):
        analyze(model, [FlowSample(sample.inputs, sample.spatial_mask, query_index=3)], progress=False)
    with pytest.raises(ValueError, match="at least one spatial token"):
        analyze(model, [FlowSample(sample.inputs, torch.zeros_like(sample.spatial_mask))], progress=False)
    with pytest.raises(ValueError, match="FlowSample"):
        analyze(model, [sample.inputs], progress=False)
    with pytest.raises(ValueError, match="sigma"):
        FlowParams(sigma=1.5)


def test_sweep_records_metric_per_layer_and_ratio(tmp_path):
    model = build_model("llama", "sdpa")
    samples = [flow_sample(model, "llama", answer=False)]
    result = sweep(model, samples, layers=[1, 4], drop_ratios=[0.0, 0.5, 1.0], progress=False)
    assert result.baseline == pytest.approx(0.0, abs=1e-9)  # KL of the unpruned model to itself
    assert [len(row) for row in result.metric] == [3, 3]
    assert all(row[0] == pytest.approx(result.baseline, abs=1e-9) for row in result.metric)
    assert all(row[2] > 0 for row in result.metric)
    assert not hasattr(model, STATE_ATTR)  # unpruned again
    result.save(tmp_path / "sweep.json")
    assert SweepResult.load(tmp_path / "sweep.json") == result

    calls = []

    def metric(m):  # a user metric: here, tokens kept at layer 4 by the last forward
        kwargs = samples[0].inputs
        with torch.no_grad(), adatoken.spatial_tokens(m, samples[0].spatial_mask):
            m(**kwargs)
        calls.append(1)
        return float(adatoken.last_stats(m).spatial_in[4][0]) if is_pruned(m) else float(NUM_SPATIAL)

    result = sweep(model, metric=metric, layers=[2], drop_ratios=[0.0, 0.25], ranking="pdrop", progress=False)
    assert result.metric == [[NUM_SPATIAL, NUM_SPATIAL * 0.75]] and result.baseline == NUM_SPATIAL
    assert result.metric_name == "metric" and result.higher_is_better and len(calls) == 3
    assert default_layers(32) == [4, 12, 24]
    with pytest.raises(ValueError, match="valid rankings"):
        sweep(model, samples, ranking="random", progress=False)
    with pytest.raises(ValueError, match="sweep layers"):
        sweep(model, samples, layers=[0], progress=False)
