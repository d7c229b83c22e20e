"""Every bad input gets a clear ValueError that names what was wrong and what is valid."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import adatoken
from adatoken.core.schedule import Schedule
from tiny_models import IMAGE_TOKEN, build_model, make_prompt, model_inputs


def test_unknown_method_lists_valid_ones():
    valid = "adatoken3d, coverage, dart, divprune, fastv, none, pdrop, random"
    with pytest.raises(ValueError, match=f"valid methods: {valid}"):
        adatoken.PruneConfig("fastvv")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match="'ratio'.*valid parameters: layer, drop_ratio, retention"):
        adatoken.prune(build_model("llama"), "fastv", ratio=0.5)


@pytest.mark.parametrize("retention", [0.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("method", ["adatoken3d", "random", "fastv", "pdrop"])
def test_retention_outside_unit_interval(method, retention):
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
        adatoken.PruneConfig(method, retention=retention)


def test_unreachable_retention_says_what_is_feasible():
    with pytest.raises(ValueError, match="at least 0.3400"):
        adatoken.prune(build_model("llama"), "adatoken3d", retention=0.2)  # 6 layers: 2 keep all, 4 keep >= 1 %
    with pytest.raises(ValueError, match="lowest it reaches is 0.3333"):
        adatoken.prune(build_model("llama"), "fastv", layer=2, retention=0.2)


def test_schedule_with_wrong_number_of_layers(tmp_path):
    path = tmp_path / "schedule.json"
    Schedule([1.0, 1.0, 0.5, 0.25]).save(path)
    with pytest.raises(ValueError, match="schedule has 4 layers but the model has 6 decoder layers"):
        adatoken.prune(build_model("llama"), "adatoken3d", schedule=str(path))


def test_spatial_mask_with_wrong_shape():
    model = adatoken.prune(build_model("llama"), "adatoken3d", retention=0.5)
    ids, spatial = make_prompt(20)
    kwargs = model_inputs(model, "llama", ids)
    wrong = r"spatial mask has shape \(1, 31\) but the input is \[batch, seq\] = \(1, 32\)"
    with pytest.raises(ValueError, match=wrong):
        with adatoken.spatial_tokens(model, spatial[:, 1:]):
            model(**kwargs)
    with pytest.raises(ValueError, match="must be a \\[batch, seq\\] tensor"):
        with adatoken.spatial_tokens(model, spatial[0]):
            pass


def test_unknown_model_family_lists_known_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model family 'gpt2'.*known families: llama, llava, mistral, qwen2"):
        adatoken.prune(model, "fastv")


def test_right_padding_is_refused():
    model = adatoken.prune(build_model("llama"), "adatoken3d", retention=0.5)
    ids, spatial = make_prompt(20)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    kwargs = model_inputs(model, "llama", ids, attention_mask=mask)
    with pytest.raises(ValueError, match="needs left padding"):
        with adatoken.spatial_tokens(model, spatial):
            model(**kwargs)


def test_bad_schedules_and_stats_before_forward():
    with pytest.raises(ValueError, match="non-increasing"):
        Schedule([1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="layer 0 must keep every spatial token"):
        Schedule([0.5, 0.5])
    with pytest.raises(ValueError, match="not pruned"):
        adatoken.last_stats(build_model("llama"))
    with pytest.raises(ValueError, match="no forward has run"):
        adatoken.last_stats(adatoken.prune(build_model("llama"), "fastv"))


def test_stats_flops_follow_the_kept_counts():
    from adatoken.core import flops
    model = adatoken.prune(build_model("llama"), "fastv", layer=2, drop_ratio=0.5)
    ids, spatial = make_prompt(40)
    with torch.no_grad(), adatoken.spatial_tokens(model, ids == IMAGE_TOKEN):
        model(**model_inputs(model, "llama", ids))
    stats = adatoken.last_stats(model)
    text = ids.shape[1] - 40
    assert [layer[0] for layer in stats.tokens_in] == [text + 40] * 2 + [text + 20] * 4
    shape = flops.ModelShape.from_config(model.config)
    expected = flops.prefill_flops(shape, [text + 40] * 2 + [text + 20] * 4, lm_head_positions=1).total
    assert stats.prefill_flops(0) == expected
    unpruned = flops.prefill_flops(shape, [text + 40] * 6, lm_head_positions=1).total
    assert stats.to_dict()["prefill_flops"] == [expected] and expected < unpruned
