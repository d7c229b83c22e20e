"""AdaToken-3D's released calibration (calibration/released.py) against a literal transcription of the
functions of junkerman2004/Adatoken-3D @ 8407182d, llava/eval/ATE_inference.py, written here from that code."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from transformers import LlamaConfig, LlamaForCausalLM

import adatoken
from adatoken.calibration import released
from adatoken.core import models
from adatoken.core.schedule import released_decay, released_fit


# --- literal transcription: loops and constants as the script has them ------------------------------
def literal_information(output_attentions, layers, image_token_id, prompt_id, total_id, q=0.3, k=0.7):
    intra_all, inter_all = [], []
    image_token_id, prompt_id, total_id = int(image_token_id / 10), int(prompt_id / 10), int(total_id / 10)
    for attentions in output_attentions:
        for j in range(layers):
            intra = inter = 0
            averaged = torch.mean(attentions[0][j], axis=1)[0].float()
            averaged = torch.nn.functional.avg_pool2d(averaged.unsqueeze(0).unsqueeze(0), 10, stride=10)[0, 0]
            for x in range(total_id):
                for y in range(total_id):
                    if image_token_id <= x < prompt_id and image_token_id <= y < prompt_id and x < y:
                        intra += averaged[x, y] * 100
                    elif x < image_token_id and image_token_id <= y < prompt_id:
                        inter += k * averaged[x, y] * 100
                    elif image_token_id < x < prompt_id and y >= prompt_id:
                        inter += q * averaged[x, y] * 100
            intra_all.append(float(intra))
            inter_all.append(float(inter))
    return intra_all, inter_all


def literal_ema(intra, inter, layers, alpha=0.4, beta=0.3, gamma=0.3):
    multimodal = intra[0]
    contribution = []
    for i in range(1, layers):
        multimodal += intra[i] * 0.73
        contribution.append(intra[i] * alpha + inter[i] * beta + gamma * multimodal)
    contribution = np.array(contribution)
    span = contribution.max() - contribution.min()  # sklearn's MinMaxScaler: a zero range scales by 1
    return (contribution - contribution.min()) / (span if span != 0 else 1.0)


def literal_fit(y, a, last=32):
    def exp_decay(x, A, B, C, D):
        return A * np.exp(-B * (x - C)) + D

    x = np.arange(1, len(y) + 1)
    derivatives = np.gradient(y)

    def objective(params):
        fitted = exp_decay(x, *params)
        return np.sum((fitted - y) ** 2) + np.sum((np.gradient(fitted) - derivatives) ** 2)

    def constraint(params):
        return [exp_decay(1, *params) - 100, exp_decay(last, *params) - a]

    with np.errstate(over="ignore", invalid="ignore"):
        return minimize(objective, [100, 0.1, 1, 0], constraints={"type": "eq", "fun": constraint}).x


# --- the tests -------------------------------------------------------------------------------------
def random_maps(layers=4, length=125, seed=0):
    """Dense (not causal) maps, so that every block the script reads is non-zero."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(1, 3, length, length, generator=g).softmax(-1) for _ in range(layers))


@pytest.mark.parametrize("bounds", [(37, 86, 120), (20, 100, 125), (0, 50, 99)])
def test_information_terms_equal_the_script(bounds):
    maps = random_maps()
    intra, inter = released.information_terms(maps, *bounds)
    expected_intra, expected_inter = literal_information([(maps,)], len(maps), *bounds)
    np.testing.assert_allclose(intra, expected_intra, rtol=1e-5)
    np.testing.assert_allclose(inter, expected_inter, rtol=1e-5)
    assert min(intra) > 0 and min(inter) > 0


def test_contribution_curve_equals_the_script():
    intra, inter = released.information_terms(random_maps(layers=8, seed=1), 37, 86, 120)
    np.testing.assert_allclose(released.contribution_curve(intra, inter), literal_ema(list(intra), list(inter), 8))
    np.testing.assert_array_equal(released.contribution_curve(np.zeros(5), np.zeros(5)), np.zeros(4))


@pytest.mark.parametrize("a", [20, 40])
def test_endpoint_fit_equals_the_script(a):
    y = literal_ema(*(list(t) for t in released.information_terms(random_maps(layers=32, seed=2), 37, 86, 120)), 32)
    params, met = released_fit(y, a / 100, 32)
    np.testing.assert_allclose(params, literal_fit(y, a), rtol=1e-6)
    assert met
    assert released_decay(1, *params) == pytest.approx(100) and released_decay(32, *params) == pytest.approx(a)


def test_on_a_causal_model_the_script_measures_nothing():
    """Every block the script sums lies above the diagonal, where causal attention is 0: the contribution is all
    zeros, and the fitted curve is its two constraints: 100 at layer 1, then ~a (docs/method.md)."""
    torch.manual_seed(0)
    config = LlamaConfig(**models.SHAPES["tiny-6l"].config, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        maps = model(input_ids=torch.randint(0, config.vocab_size, (1, 120)), output_attentions=True).attentions
    intra, inter = released.information_terms(maps, 30, 100, 120)
    assert not intra.any() and not inter.any()
    schedule = released.released_schedule(maps, 30, 100, 120, final_keep=0.4)
    assert schedule.keep[0] == 1.0 and schedule.keep[-1] == pytest.approx(0.4, abs=1e-3)
    assert schedule.keep[2] == pytest.approx(0.4, abs=0.02)  # a step, not a curve


def test_released_variant_runs_stages_of_its_curve():
    schedule = adatoken.PruneConfig("adatoken3d", variant="released", final_keep=0.1).build().schedule(32)
    stages = schedule.meta["stages"]
    assert stages == [4, 8, 12, 16, 18, 20, 22, 24, 26, 28]
    assert schedule.keep[:4] == [1.0] * 4 and len(set(schedule.keep[28:])) == 1
    assert {i for i in range(1, 32) if schedule.keep[i] < schedule.keep[i - 1]} <= set(stages)
    # uncalibrated, the curve is the script's fit to its all-zero contribution: a step to ~final_keep at once
    assert schedule.meta["stage_keep"] == [schedule.keep[s] for s in stages]
    assert schedule.keep[4] == pytest.approx(0.1, abs=0.01) and schedule.keep[-1] == pytest.approx(0.1, abs=1e-3)
    at_04 = adatoken.PruneConfig("adatoken3d", variant="released", retention=0.4).build().schedule(32)
    assert at_04.retention == pytest.approx(0.4, abs=1e-6)
    with pytest.raises(ValueError, match="lowest it reaches"):
        adatoken.PruneConfig("adatoken3d", variant="released", retention=0.1).build().schedule(32)
