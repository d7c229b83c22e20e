"""`generate`, every way users call it (docs/generate.md): per-conversation state, no cache == cache, copies,
expansion of an explicit mask, attention maps at full size, and the warnings that replace silent no-ops."""
import copy
import pickle
import warnings

import pytest
import torch

import adatoken
from adatoken.core.runtime import is_pruned
from invariants import grid_points, pruning
from tiny_models import IMAGE_TOKEN, build_model, make_prompt, model_inputs

# never generate the image token: a step without a cache would hand LLaVA an image token without pixels
GREEDY = dict(do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])


def pruned_llama(attn: str = "sdpa", method: str = "adatoken3d", **params):
    """A LLaMA text decoder pruned with `method` (adatoken3d at retention 0.5 by default), and the
    inputs_embeds and spatial mask of a 40-spatial-token prompt for it."""
    model = build_model("llama", attn)
    ids, spatial = make_prompt(40)
    adatoken.prune(model, method, **(params or {"retention": 0.5}))
    return model, model_inputs(model, "llama", ids), spatial


def llava_inputs(prompt: int = 7, seed: int = 0) -> dict:
    ids, _ = make_prompt(16, prompt=prompt, seed=seed)  # llava: the 4x4 patch grid of a 16px image
    return model_inputs(LLAVA, "llava", ids, seed=seed)


LLAVA = build_model("llava", "sdpa")


@pytest.fixture
def llava():
    yield LLAVA
    adatoken.unprune(LLAVA)


@pytest.mark.parametrize("method,params", pruning())
def test_generate_without_cache_equals_with_cache(llava, method, params):
    """Each step without a cache is a new prefill of prompt + generated tokens: it ranks by the prompt's last
    token, as the cached prefill did, so the tokens are the same."""
    adatoken.prune(llava, method, **params)
    same_tokens_with_and_without_cache(llava, llava_inputs(seed=1), 24)  # ranking by the newest token differs here


def test_text_decoder_without_cache_equals_with_cache():
    model = build_model("qwen2", "sdpa")
    ids, spatial = make_prompt(40)
    adatoken.prune(model, "adatoken3d", retention=0.5)
    with adatoken.spatial_tokens(model, spatial):
        same_tokens_with_and_without_cache(model, model_inputs(model, "qwen2", ids), 12)


def same_tokens_with_and_without_cache(model, inputs: dict, tokens: int) -> None:
    cached, uncached = (model.generate(**inputs, max_new_tokens=tokens, use_cache=c, **GREEDY) for c in (True, False))
    assert torch.equal(cached, uncached)


def test_interleaved_conversations_each_continue_their_own_cache():
    """A, then B with a longer prompt, then A again from A's cache: A continues as if B never ran (eager: the
    decode mask is sliced by the layer's record, which must be A's)."""
    llava = build_model("llava", "eager")
    adatoken.prune(llava, "fastv")
    a, b = llava_inputs(), llava_inputs(prompt=20, seed=1)
    straight = llava.generate(**a, max_new_tokens=8, **GREEDY)
    first = llava.generate(**a, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
    llava.generate(**b, max_new_tokens=4, **GREEDY)
    sequence = first.sequences
    continued = llava.generate(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                               past_key_values=first.past_key_values, max_new_tokens=4, **GREEDY)
    assert torch.equal(continued, straight)


STATIC_CASES = [("llava", "sdpa", "fastv"), ("llava", "eager", "pdrop"), ("qwen2_vl", "sdpa", "adatoken3d"),
                ("qwen2_vl", "eager", "dart"), ("llama", "sdpa", "divprune"), ("llama", "eager", "coverage")]


@pytest.mark.parametrize("family,attn,method", STATIC_CASES)
def test_static_cache_equals_the_dynamic_cache(family, attn, method):
    """Each layer's static cache holds what that layer kept, in its first slots; the masks never reach the
    empty slots after them, in prefill and in every decoding step."""
    model = build_model(family, attn)
    ids, spatial = make_prompt(16 if family == "llava" else 40)
    adatoken.prune(model, method, **({"retention": 0.5} if method != "pdrop" else {}))
    inputs = model_inputs(model, family, ids)
    with adatoken.spatial_tokens(model, spatial, points=grid_points(spatial)):
        dynamic = model.generate(**inputs, max_new_tokens=10, **GREEDY)
        static = model.generate(**inputs, max_new_tokens=10, cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)
    assert adatoken.last_stats(model).spatial_in[-1][0] < spatial.sum()


def test_attention_maps_with_a_static_cache_are_refused(llava):
    adatoken.prune(llava, "fastv")
    with pytest.raises(ValueError, match="output_attentions with a static KV cache"):
        llava.generate(**llava_inputs(), max_new_tokens=2, cache_implementation="static", output_attentions=True,
                       return_dict_in_generate=True, **GREEDY)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_left_padded_batch_equals_the_dynamic_cache(attn):
    """Samples keeping different numbers of tokens: filler slots and padding stay masked in the static slots."""
    model = build_model("llama", attn)
    adatoken.prune(model, "adatoken3d", retention=0.5)
    prompts = [make_prompt(40, seed=1)[0], make_prompt(23, prompt=4, seed=2)[0]]
    width = max(p.shape[1] for p in prompts)
    ids = torch.stack([torch.cat((torch.zeros(width - p.shape[1], dtype=torch.long), p[0])) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - p.shape[1] for p in prompts]).long()
    inputs = model_inputs(model, "llama", ids, attention_mask=mask)
    with adatoken.spatial_tokens(model, ids == IMAGE_TOKEN):
        dynamic = model.generate(**inputs, max_new_tokens=8, **GREEDY)
        static = model.generate(**inputs, max_new_tokens=8, cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adatoken3d", "pdrop"])
def test_compiled_forward_with_static_cache_compiles_the_decode_step_once(method):
    """`model.forward = torch.compile(model.forward)` + a static cache, the path to CUDA-graph decoding: the same
    tokens as uncompiled, and a longer generation compiles nothing new (no recompilation per decoding step).
    backend="eager" checks dynamo's capture (guards, graph breaks) without the cost of generating kernels."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = build_model("llama", "sdpa")
    ids, spatial = make_prompt(40)
    inputs = model_inputs(model, "llama", ids)
    adatoken.prune(model, method, **({} if method == "pdrop" else {"retention": 0.5}))
    static = dict(cache_implementation="static", **GREEDY)
    with adatoken.spatial_tokens(model, spatial):
        expected = model.generate(**inputs, max_new_tokens=10, **static)
        model.forward = torch.compile(model.forward, backend="eager")
        try:
            short = model.generate(**inputs, max_new_tokens=3, **static)
            counters.clear()
            long = model.generate(**inputs, max_new_tokens=10, **static)
        finally:
            del model.forward
            torch._dynamo.reset()
    assert torch.equal(long, expected) and torch.equal(short, expected[:, :short.shape[1]])
    assert counters["stats"].get("unique_graphs", 0) == 0  # steps 4-10 reused what steps 1-3 compiled


def test_a_deep_copy_is_pruned_on_its_own(llava):
    adatoken.prune(llava, "fastv", layer=2, drop_ratio=0.5)
    inputs = llava_inputs()
    twin = copy.deepcopy(llava)
    adatoken.unprune(llava)  # the original's hooks are gone; the copy's must still run, on its own state
    assert is_pruned(twin) and not is_pruned(llava)
    with torch.no_grad():
        twin(**inputs)
        reference = llava(**inputs).logits
    assert adatoken.last_stats(twin).spatial_in[-1] == [8]
    adatoken.unprune(twin)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, reference)


def test_a_pickled_model_is_pruned_on_its_own():
    model, inputs, spatial = pruned_llama()
    twin = pickle.loads(pickle.dumps(model))
    with torch.no_grad(), adatoken.spatial_tokens(twin, spatial):
        twin(**inputs)
    assert adatoken.last_stats(twin).spatial_in[-1] < [40]
    with pytest.raises(ValueError, match="no forward has run"):
        adatoken.last_stats(model)


@pytest.mark.parametrize("expansion", [dict(num_beams=3), dict(num_return_sequences=2, do_sample=True),
                                       dict(num_beams=3, num_return_sequences=2)])
def test_explicit_mask_follows_generates_expansion(expansion):
    model, inputs, spatial = pruned_llama()
    with adatoken.spatial_tokens(model, spatial):  # [1, S]: the prompt's mask, not the expanded batch's
        model.generate(**inputs, max_new_tokens=3, pad_token_id=0, **{"do_sample": False, **expansion})
    stats = adatoken.last_stats(model)  # beam search runs num_beams rows; sampling one per returned sequence
    assert stats.num_samples == expansion.get("num_beams", expansion.get("num_return_sequences"))
    expected = adatoken.PruneConfig("adatoken3d", retention=0.5).build().schedule(6).counts(40)
    assert [layer[0] for layer in stats.spatial_in] == expected


def test_attention_maps_are_full_size_with_zeros_where_a_layer_held_nothing():
    model = build_model("llama", "eager")
    ids, spatial = make_prompt(40)
    inputs = model_inputs(model, "llama", ids)
    with torch.no_grad():
        unpruned = model(**inputs, output_attentions=True).attentions
    adatoken.prune(model, "fastv", layer=2, drop_ratio=0.5)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial):
        maps = model(**inputs, output_attentions=True).attentions
    length = ids.shape[1]
    assert all(m.shape == (1, 4, length, length) for m in maps)
    for layer in (0, 1):  # before the drop: what the unpruned model computes
        torch.testing.assert_close(maps[layer], unpruned[layer], atol=1e-6, rtol=0)
    kept = set(adatoken.last_stats(model).kept_positions[3][0])
    dropped = [p for p in spatial[0].nonzero().flatten().tolist() if p not in kept]
    assert len(dropped) == 20
    deep = maps[3][0]
    assert float(deep[:, :, dropped].abs().sum()) == 0 and float(deep[:, dropped].abs().sum()) == 0
    held = [p for p in range(length) if p not in dropped]
    torch.testing.assert_close(deep[:, held].sum(-1), torch.ones(4, len(held)))  # each held row is a softmax
    with adatoken.spatial_tokens(model, spatial):
        steps = model.generate(**inputs, max_new_tokens=3, output_attentions=True, return_dict_in_generate=True,
                               **GREEDY).attentions
    assert [tuple(steps[2][3].shape)] == [(1, 4, 1, length + 2)]
    assert float(steps[2][3][0, :, 0, dropped].abs().sum()) == 0


def test_new_image_in_a_later_turn_warns_once(llava):
    """Only a prefill prunes: spatial tokens that arrive in a continuation are kept, and the user is told."""
    adatoken.prune(llava, "fastv")
    first = llava.generate(**llava_inputs(), max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    ids, _ = make_prompt(16, seed=3)
    turn = torch.cat([first.sequences, ids], 1)
    pixels = model_inputs(llava, "llava", ids, seed=3)["pixel_values"]
    with pytest.warns(UserWarning, match="later turn.*kept, not pruned"):
        with torch.no_grad():
            llava(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(turn),
                  past_key_values=first.past_key_values)


def _warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            call()
    return [str(w.message) for w in caught if "adatoken" in str(w.message)]


def test_no_spatial_tokens_warns_once_naming_the_causes():
    model, inputs, _ = pruned_llama(method="fastv")
    said = _warnings(lambda: (model(**inputs), model(**inputs)))  # a text decoder, no spatial_tokens
    assert len(said) == 1 and "found no spatial tokens" in said[0] and "adatoken.spatial_tokens" in said[0]


def test_multimodal_model_called_with_inputs_embeds_warns(llava):
    adatoken.prune(llava, "fastv")
    ids, _ = make_prompt(16)
    embeds = llava.get_input_embeddings()(ids).detach()
    said = _warnings(lambda: llava(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)))
    assert len(said) == 1 and "inputs_embeds" in said[0]


def test_pruning_the_inner_decoder_warns():
    model = build_model("llava", "sdpa")
    adatoken.prune(model.model.language_model, "fastv")
    said = _warnings(lambda: model(**llava_inputs()))
    assert len(said) == 1 and "inner decoder" in said[0]


def test_text_only_input_of_a_multimodal_model_does_not_warn(llava):
    adatoken.prune(llava, "fastv")
    ids, _ = make_prompt(0)
    assert _warnings(lambda: llava(input_ids=ids, attention_mask=torch.ones_like(ids))) == []


def test_bad_parameters_name_what_is_valid(tmp_path):
    with pytest.raises(ValueError, match="random seed must be a non-negative integer, got 'x'"):
        adatoken.PruneConfig("random", seed="x")
    path = tmp_path / "schedule.json"
    path.write_text('{"format": "adatoken.schedule/v1", "keep": [1.0, "x"]}')
    with pytest.raises(ValueError, match=rf"{path}.*keep\[1\] is 'x'"):
        adatoken.PruneConfig("adatoken3d", schedule=path)


@pytest.mark.parametrize("argv,message", [
    (["bench", "--device", "cuda:7"], "no CUDA GPU" if not torch.cuda.is_available() else "CUDA device"),
    (["eval", "--device", "cuda:7"], "no CUDA GPU" if not torch.cuda.is_available() else "CUDA device"),
    (["analyze", "--device", "nonsense"], "not a torch device"),
    (["bench", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["bench", "--batch", "1", "0"], "--batch must be at least 1, got 0"),
])
def test_cli_refuses_bad_options_in_one_line(capsys, argv, message):
    from adatoken.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_refuses_configs_it_cannot_benchmark(tmp_path, capsys):
    from transformers import GPT2Config

    from adatoken.cli import main

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for folder, message in [("gpt2", "does not know model family 'gpt2'"), ("broken", "not a readable"),
                            ("missing", "not a readable")]:
        assert main(["bench", "--config", str(tmp_path / folder), "--repeats", "1"]) == 2
        assert message in capsys.readouterr().err


def test_bench_creates_the_out_folder_before_it_runs(tmp_path):
    from adatoken.cli import main

    out = tmp_path / "new" / "folder" / "bench.json"
    assert main(["bench", "--shape", "tiny-6l", "--spatial", "32", "--text", "8", "--retentions", "0.5",
                 "--methods", "fastv", "--new-tokens", "0", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file()


def test_scores_and_hidden_states_of_generate_have_unpruned_shapes(llava):
    inputs = llava_inputs()
    adatoken.prune(llava, "pdrop", layers=(2, 3, 4), ratio=0.5)
    out = llava.generate(**inputs, max_new_tokens=3, output_scores=True, output_hidden_states=True,
                         return_dict_in_generate=True, **GREEDY)
    length = inputs["input_ids"].shape[1]
    assert len(out.scores) == 3 and out.scores[0].shape == (1, llava.config.text_config.vocab_size)
    assert all(h.shape[:2] == (1, length) for h in out.hidden_states[0])  # the prefill step, every layer
    assert all(h.shape[:2] == (1, 1) for h in out.hidden_states[1])
    assert adatoken.last_stats(llava).spatial_in[-1] == [2]  # 16 spatial tokens halved three times


def test_generate_prefill_runs_the_final_norm_and_head_on_the_last_position_only(llava):
    """generate reads the last position's logits; a direct forward (or a loss) still gets every position."""
    inputs = llava_inputs()
    with torch.no_grad():
        unpruned = llava(**inputs).logits[:, -1]
    adatoken.prune(llava, "adatoken3d", retention=0.5)
    rows = []
    hook = llava.model.language_model.norm.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    try:
        out = llava.generate(**inputs, max_new_tokens=2, output_scores=True, return_dict_in_generate=True, **GREEDY)
        with torch.no_grad():
            direct = llava(**inputs).logits
    finally:
        hook.remove()
    length = inputs["input_ids"].shape[1]
    assert rows == [1, 1, length]  # prefill and one decode step inside generate, then the direct forward
    assert direct.shape[1] == length
    torch.testing.assert_close(out.scores[0], direct[:, -1].masked_fill(
        torch.isinf(out.scores[0]), float("-inf")), atol=1e-5, rtol=0)
    assert not torch.equal(direct[:, -1], unpruned)  # the pruned prefill is what both read


def test_a_generate_that_expands_its_inputs_ranks_by_the_expanded_prompts_last_token():
    """LLaVA-3D's generate takes input_ids with one image placeholder and hands its LLM the expanded
    embeddings: the ranking query is the last token of what the decoder receives, not of input_ids."""
    from transformers import LlamaForCausalLM

    class ExpandingLM(LlamaForCausalLM):
        def generate(self, input_ids, spatial_features, **kwargs):
            at = int((input_ids[0] == IMAGE_TOKEN).nonzero())
            text = self.get_input_embeddings()(input_ids).detach()
            embeds = torch.cat([text[:, :at], spatial_features, text[:, at + 1:]], 1)
            return super().generate(inputs_embeds=embeds, **kwargs)

    base = build_model("llama", "sdpa")
    model = ExpandingLM(base.config).eval()
    model.load_state_dict(base.state_dict())
    ids, spatial = make_prompt(40)
    embeds = model_inputs(model, "llama", ids)["inputs_embeds"]
    placeholder = torch.cat([ids[:, :5], ids[:, 5:6], ids[:, 45:]], 1)  # one image token where 40 were
    adatoken.prune(model, "fastv", layer=2, drop_ratio=0.5)
    with torch.no_grad(), adatoken.spatial_tokens(model, spatial):
        model(inputs_embeds=embeds)
    direct = adatoken.last_stats(model).kept_positions
    for use_cache in (True, False):
        with adatoken.spatial_tokens(model, spatial):
            model.generate(placeholder, embeds[:, 5:45], max_new_tokens=3, use_cache=use_cache, **GREEDY)
        assert adatoken.last_stats(model).kept_positions == direct
