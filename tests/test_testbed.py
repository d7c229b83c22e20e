"""The embedded testbed: scenes, spatial tokens, questions, tokenizer, model round trip, training."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adatoken.testbed import model as testbed_model
from adatoken.testbed import questions as Q
from adatoken.testbed.data import SPLITS, load_split, split_seeds
from adatoken.testbed.model import ModelConfig, load
from adatoken.testbed.scenes import CLASS_NAMES, Scene, SceneObject, generate_scene
from adatoken.testbed.spatial import SpatialConfig, build_spatial_tokens, spatial_tokens_for_seed, voxel_pool
from adatoken.testbed.tokenizer import build_tokenizer, dialogue_ids, load_tokenizer, words
from adatoken.testbed.train import TrainConfig, curriculum_tokens, train, training_batch


# ---- scenes -------------------------------------------------------------------------------------------
def test_scene_is_deterministic_per_seed_and_round_trips_json():
    a, b = generate_scene(123), generate_scene(123)
    assert a == b and a.to_json() == b.to_json()
    assert generate_scene(124) != a
    assert Scene.from_json(a.to_json()) == a


def test_scenes_are_plausible_rooms():
    seen = set()
    for seed in range(50):
        scene = generate_scene(seed)
        assert 6 <= len(scene.objects) <= 16
        boxes = np.array([o.box for o in scene.objects])
        assert (boxes[:, :3] >= 0).all() and (boxes[:, 3:] <= np.array(scene.room) + 1e-9).all()
        for i in range(len(boxes)):  # no two boxes overlap
            for j in range(i):
                assert np.any(boxes[i, :3] >= boxes[j, 3:]) or np.any(boxes[j, :3] >= boxes[i, 3:])
        seen |= {o.cls for o in scene.objects}
    assert len(CLASS_NAMES) >= 12 and len(seen) >= 12


def test_bad_scene_seed_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="non-negative integer"):
        generate_scene(-1)
    with pytest.raises(ValueError, match="valid splits: train, calib, test"):
        load_split("dev")


# ---- spatial tokens -----------------------------------------------------------------------------------
def test_voxel_pool_matches_hand_worked_example():
    # Four patches, 0.2 m voxels. Voxel keys floor(p / 0.2): (0,0,0), (0,0,0), (1,0,0), (0,1,0).
    points = np.array([[0.05, 0.05, 0.05], [0.15, 0.10, 0.00], [0.25, 0.05, 0.05], [0.10, 0.30, 0.10]])
    features = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0]])
    pooled_points, pooled_features, inverse = voxel_pool(points, features, 0.2)
    # Voxels in lexicographic key order: (0,0,0) <- patches 0,1; (0,1,0) <- patch 3; (1,0,0) <- patch 2.
    np.testing.assert_allclose(pooled_points, [[0.10, 0.075, 0.025], [0.10, 0.30, 0.10], [0.25, 0.05, 0.05]], atol=1e-6)
    np.testing.assert_allclose(pooled_features, [[2.0, 1.0], [0.0, 4.0], [5.0, 5.0]])
    assert inverse.tolist() == [0, 0, 2, 1]


def test_spatial_tokens_are_deterministic_voxel_ordered_and_capped():
    scene = generate_scene(7)
    a, b = build_spatial_tokens(scene), build_spatial_tokens(scene)
    np.testing.assert_array_equal(a.features, b.features)
    keys = np.floor(a.points / 0.2).astype(int)  # a voxel's mean point lies inside the voxel
    assert len({tuple(k) for k in keys}) == len(a) and [tuple(k) for k in keys] == sorted(tuple(k) for k in keys)
    assert a.features.shape == (len(a), SpatialConfig().feature_dim) and a.features.dtype == np.float32
    assert (a.object_ids >= 0).mean() < 0.5  # walls and floor dominate, as in real scans
    capped = build_spatial_tokens(scene, SpatialConfig(max_tokens=100))
    assert len(capped) == 100


# ---- questions against hand-built geometry -------------------------------------------------------------
def _room() -> Scene:
    """A 6 x 5 m room drawn on paper; the expected answers below were worked out by hand."""
    objects = [
        ("sofa", "red", (0.5, 0.1, 0.0, 2.5, 1.0, 0.8)),     # against the y=0 wall
        ("tv", "black", (2.5, 4.92, 1.0, 3.5, 5.0, 1.6)),    # on the far wall
        ("lamp", "yellow", (0.3, 1.3, 0.0, 0.6, 1.6, 1.6)),  # just behind the sofa's left end
        ("chair", "blue", (4.0, 2.0, 0.0, 4.5, 2.5, 0.9)),
        ("chair", "green", (4.0, 3.0, 0.0, 4.5, 3.5, 0.9)),
        ("table", "brown", (3.0, 2.2, 0.0, 3.8, 3.2, 0.75)),
        ("shelf", "white", (0.0, 3.5, 0.0, 0.35, 4.5, 1.8)),  # on the x=0 wall
    ]
    return Scene("hand", 0, (6.0, 5.0, 2.7), "white", "grey",
                 tuple(SceneObject(i, c, col, box) for i, (c, col, box) in enumerate(objects)))


def _answers(qtype: str) -> dict[str, str]:
    cands = Q.candidate_questions(_room(), np.random.default_rng(0))[qtype]
    return {q.question: q.answer for q in cands}


def test_attribute_asks_only_about_unique_classes():
    answers = _answers("attribute")
    assert answers["What colour is the lamp?"] == "yellow" or answers["What is the colour of the lamp?"] == "yellow"
    assert not any("chair" in q for q in answers)  # two chairs: no unique referent


def test_existence_and_counting():
    existence = {words(q)[3]: a for q, a in _answers("existence").items()}
    assert existence["sofa"] == "yes" and existence["bed"] == "no" and existence["chair"] == "yes"
    counting = {words(q)[2]: a for q, a in _answers("counting").items()}
    assert counting == {"chairs": "two", "sofas": "one", "tvs": "one", "lamps": "one", "tables": "one",
                        "shelves": "one"}


def test_relation_closest_object():
    room = _room()
    # Lamp centre (0.45, 1.45, 0.8): sofa box 0.45 m away (dy), shelf 2.05 m, everything else farther.
    assert Q.point_box_distance(room.find("lamp").centre, room.find("sofa").box) == pytest.approx(np.hypot(0.05, 0.45))
    assert Q.closest_object(room, room.find("lamp")).cls == "sofa"
    assert "sofa" in {a for q, a in _answers("relation").items() if q.endswith("lamp?")}


def test_situated_left_right_behind():
    room = _room()
    # At the sofa (1.5, 0.55) facing the tv (3.0, 4.96): left is (-0.947, 0.322). The shelf's corner (0, 4.5)
    # reaches 2.69 m to the left, the lamp 1.48 m; to the right a chair's corner (4.5, 2.0) reaches 2.38 m,
    # the table 1.65 m; nothing is more than 0.4 m behind.
    position, frame = Q.egocentric_frame(room.find("sofa"), room.find("tv"))
    np.testing.assert_allclose(frame["left"], [-0.947, 0.322], atol=1e-3)
    exclude = {0, 1}
    assert Q.farthest_towards(room, position, frame["left"], exclude).cls == "shelf"
    assert Q.farthest_towards(room, position, frame["right"], exclude).cls == "chair"
    assert Q.farthest_towards(room, position, frame["behind"], exclude) is None
    assert Q.side_of(position, frame, room.find("lamp")) == "left"
    assert Q.side_of(position, frame, room.find("table")) is None  # only 23 degrees off straight ahead


def test_questions_per_type_can_differ_by_type():
    scene = generate_scene(11)

    def draw(per_type):
        return Q.sample_questions(scene, np.random.default_rng(0), per_type)

    counts = lambda qs: {t: sum(q.qtype == t for q in qs) for t in Q.QUESTION_TYPES}  # noqa: E731
    assert draw(2) == draw(dict.fromkeys(Q.QUESTION_TYPES, 2))  # an int is the same count for every type
    uneven = counts(draw({"attribute": 1, "existence": 1, "counting": 1, "relation": 3, "situated": 5}))
    assert uneven["existence"] == 1 and uneven["situated"] == 5 and 1 <= uneven["relation"] <= 3


def test_splits_are_deterministic_disjoint_and_big_enough():
    ranges = [set(split_seeds(s)) for s in SPLITS]
    assert all(not (a & b) for i, a in enumerate(ranges) for b in ranges[i + 1:])
    assert load_split("calib", num_scenes=3) == load_split("calib", num_scenes=3)
    test = load_split("test", num_scenes=30)
    assert {s.qtype for s in test} == set(Q.QUESTION_TYPES)
    assert len(test) / 30 * SPLITS["test"][1] >= 1000  # the full test split has >= 1,000 questions


# ---- tokenizer and model --------------------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    text = "I am at the bed facing the tv. What is on my left?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "i am at the bed facing the tv . what is on my left ?" == " ".join(words(text))
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "tokenizer.json"))(text, add_special_tokens=False)["input_ids"] == ids
    for sample in load_split("calib", num_scenes=5):  # every generated question and answer is in vocabulary
        dialogue = f"{sample.question} {sample.answers[0]}"
        assert tok.unk_token_id not in tok(dialogue, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    return load()


def test_shipped_checkpoint_builds_inputs_and_generates(shipped):
    samples = load_split("test", num_scenes=2)[:6]
    inputs = shipped.build_inputs(samples)
    batch, length, hidden = inputs["inputs_embeds"].shape
    assert hidden == shipped.llm.config.hidden_size and inputs["attention_mask"].dtype == torch.long
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    counts = [len(shipped.spatial_tokens(s)) for s in samples]
    assert inputs["spatial_mask"].sum(1).tolist() == counts
    answers = shipped.answer(samples, batch_size=6)
    assert answers == [shipped.answer([s])[0] for s in samples]  # padding does not change answers
    assert sum(a in s.answers for a, s in zip(answers, samples)) >= 4


def test_probe_scores_find_a_linear_signal_and_only_that():
    from adatoken.testbed.probe import probe_scores, r_squared

    rng = np.random.default_rng(0)
    target = rng.normal(size=(400, 2))
    carried = np.concatenate([target @ rng.normal(size=(2, 8)), rng.normal(size=(400, 24))], 1)
    assert probe_scores(carried + 0.1 * rng.normal(size=carried.shape), target, r_squared) > 0.9
    assert probe_scores(rng.normal(size=(400, 32)), target, r_squared) < 0.1


@pytest.mark.slow
def test_shipped_model_fetches_colour_and_position_at_the_object_word(shipped):
    from adatoken.testbed.probe import probe_object_word

    rows = probe_object_word(shipped, num_scenes=200, progress=False)
    assert [r["layer"] for r in rows] == list(range(shipped.llm.config.num_hidden_layers + 1))
    assert rows[0]["colour_accuracy"] < 0.5 < 0.9 < rows[1]["colour_accuracy"]  # the word alone has no colour
    assert rows[0]["position_r2"] < 0.2 < 0.8 < rows[1]["position_r2"]  # ... nor a place: the first layer fetches it
    with pytest.raises(ValueError, match="probes need >= 40: raise num_scenes"):
        probe_object_word(shipped, num_scenes=5, progress=False)


def test_fresh_model_starts_with_copy_heads_and_aligned_words():
    cfg = ModelConfig(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, position_hidden=16)
    model = testbed_model.TestbedModel.create(cfg, seed=3)
    llm = model.llm
    assert llm.lm_head.weight is llm.get_input_embeddings().weight  # tied head
    assert llm.config.rope_parameters["rope_theta"] == cfg.rope_theta
    for layer in llm.model.layers:
        attn = layer.self_attn
        torch.testing.assert_close(attn.k_proj.weight, attn.q_proj.weight)
        torch.testing.assert_close(attn.o_proj.weight, attn.v_proj.weight.T * cfg.copy_init)
        assert not layer.mlp.down_proj.weight.any()
    # the projector maps a class code onto its word: a lamp's feature lands nearest the word "lamp"
    from adatoken.testbed.spatial import SURFACE_CLASSES, spatial_codes

    lamp = torch.from_numpy(spatial_codes(model.spatial_config)["class"][SURFACE_CLASSES.index("lamp")]).float()
    nearest = (model.encoder.feature_proj(lamp) @ llm.get_input_embeddings().weight.T).argmax().item()
    assert model.tokenizer.convert_ids_to_tokens(nearest) == "lamp"
    again = testbed_model.TestbedModel.create(cfg, seed=3)  # weights depend only on the seed
    for a, b in zip(again.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_position_features_make_near_points_alike():
    """Random Fourier features: the dot product of two points' cos/sin features falls with their distance, so
    attention can find what is near a point by matching its features."""
    encoder = testbed_model.SpatialEncoder(feature_dim=8, hidden_size=16, position_hidden=8, position_frequencies=256)

    def similarity(a, b):
        angles = (torch.tensor([a, b]) / testbed_model.POSITION_SCALE) @ encoder.frequencies
        features = torch.cat([angles.cos(), angles.sin()], -1)
        return (features[0] @ features[1]).item() / encoder.frequencies.shape[1]

    here = [2.0, 2.0, 0.5]
    assert similarity(here, here) == pytest.approx(1.0)
    assert similarity(here, [2.2, 2.0, 0.5]) > 0.8 > 0.1 > abs(similarity(here, [4.0, 3.0, 0.5]))
    assert "frequencies" in encoder.state_dict()  # saved with the weights: a loaded model sees the same features


def test_curriculum_shows_centres_then_objects_then_everything():
    cfg = TrainConfig(curriculum_objects=10, curriculum_hold=20, curriculum_ramp=10)
    tokens = spatial_tokens_for_seed(3)
    rng = np.random.default_rng(0)
    where = {p.tobytes(): i for i, p in enumerate(tokens.points)}

    def seen(step):
        kept = curriculum_tokens(cfg, step, tokens, rng)
        assert np.all(np.diff([where[p.tobytes()] for p in kept.points]) > 0)  # a subsequence, in voxel order
        return kept

    assert seen(0).centre.all() and len(seen(9)) == tokens.centre.sum()
    objects = seen(10)
    assert (objects.object_ids >= 0).all() and len(objects) == (tokens.object_ids >= 0).sum()
    assert len(objects) < len(seen(25)) < len(tokens)  # the background comes back during the ramp
    assert seen(30) is tokens


def test_grounding_targets_are_object_words_and_answer_objects():
    from adatoken.testbed.grounding import grounding_targets

    room, tokenizer = _room(), build_tokenizer()
    asked = [Q.Question("relation", "What is closest to the lamp?", "sofa", (2, 0)),
             Q.Question("counting", "How many chairs are there?", "two", (3, 4)),
             Q.Question("situated", "I am at the sofa facing the tv. Is the lamp on my left or right?", "left",
                        (0, 1, 2)),
             Q.Question("situated", "I am at the sofa facing the tv. What is on my left?", "shelf", (0, 1, 6))]
    ids, is_answer = dialogue_ids(tokenizer, [(q.question, q.answer) for q in asked])
    found = grounding_targets(room, set(range(7)), asked, ids, is_answer, tokenizer)

    def scaled(x: float, y: float) -> np.ndarray:
        return (np.array([x, y]) - testbed_model.POSITION_CENTRE) / testbed_model.POSITION_SCALE

    lamp, sofa, tv, shelf = scaled(0.45, 1.45), scaled(1.5, 0.55), scaled(3.0, 4.96), scaled(0.175, 4.0)
    indices, positions = found["word"]
    # "chairs" is not a unique object's word, and answers ("sofa", "shelf") are not prompt words
    assert tokenizer.convert_ids_to_tokens([ids[i] for i in indices]) == ["lamp", "sofa", "tv", "lamp", "sofa", "tv"]
    np.testing.assert_allclose(positions, [lamp, sofa, tv, lamp, sofa, tv])
    indices, positions = found["answer"]  # relation and object-answered situated questions, not "left or right"
    assert [tokenizer.convert_ids_to_tokens(ids[i + 1]) for i in indices] == ["sofa", "shelf"]
    assert all(tokenizer.convert_ids_to_tokens(ids[i]) == ":" and not is_answer[i] for i in indices)
    np.testing.assert_allclose(positions, [sofa, shelf])
    unseen_lamp = grounding_targets(room, {0, 1, 6}, asked, ids, is_answer, tokenizer)["word"][0]
    assert tokenizer.convert_ids_to_tokens([ids[i] for i in unseen_lamp]) == ["sofa", "tv", "sofa", "tv"]


def test_grounding_heads_regress_positions_and_check_layers():
    from adatoken.testbed.grounding import GroundingHeads

    heads = GroundingHeads(hidden_size=8, num_layers=2, word_layer=1, answer_layer=2)
    hidden = tuple(torch.randn(2, 5, 8) for _ in range(3))
    batch = {"word_rows": torch.tensor([0, 1]), "word_cols": torch.tensor([3, 4]), "word_positions": torch.zeros(2, 2),
             "answer_rows": torch.tensor([], dtype=torch.long), "answer_cols": torch.tensor([], dtype=torch.long),
             "answer_positions": torch.zeros(0, 2)}
    losses = heads.loss(hidden, batch)
    expected = heads.heads["word"](hidden[1][[0, 1], [3, 4]]).pow(2).mean()
    torch.testing.assert_close(losses["word"], expected)
    assert losses["answer"].item() == 0.0  # no relation/situated answer in the batch: nothing to regress
    with pytest.raises(ValueError, match=r"answer grounding layer must be in 0\.\.2 .* got 4"):
        GroundingHeads(hidden_size=8, num_layers=2, word_layer=1, answer_layer=4)


def test_checkpoints_from_before_fourier_features_still_load(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16,
                      position_frequencies=0)
    model = testbed_model.TestbedModel.create(cfg, seed=1)
    model.save(tmp_path)
    weights = load_file(str(tmp_path / "encoder.safetensors"))  # as checkpoints saved before the features were
    del weights["frequencies"]
    save_file(weights, str(tmp_path / "encoder.safetensors"))
    meta = json.loads((tmp_path / "testbed.json").read_text())
    del meta["model"]["position_frequencies"]
    (tmp_path / "testbed.json").write_text(json.dumps(meta))
    samples = load_split("test", num_scenes=1)[:3]
    assert load(tmp_path).answer(samples) == model.eval().answer(samples)


@pytest.mark.slow
def test_tiny_training_lowers_loss_and_resumes(tmp_path):
    model_cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, position_hidden=32)
    cfg = TrainConfig(out=str(tmp_path), steps=20, batch_size=4, per_type=1, lr=3e-3, warmup=2, eval_every=0,
                      checkpoint_every=10, threads=1, model=model_cfg, grounding_layers=(1, 2))

    def held_out_loss(model) -> float:
        batch = training_batch(model, cfg, step=10_000)
        with torch.no_grad():
            return model.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss.item()

    before = held_out_loss(testbed_model.TestbedModel.create(model_cfg, seed=cfg.seed))
    trained = train(cfg, progress=False)
    assert held_out_loss(trained) < before - 0.5
    reloaded = load(tmp_path / "model")
    assert held_out_loss(reloaded) == pytest.approx(held_out_loss(trained))
    resumed = train(cfg, progress=False)  # state.pt says all 20 steps are done: nothing is retrained
    for a, b in zip(resumed.llm.parameters(), trained.llm.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="written by a different training configuration"):
        train(dataclasses.replace(cfg, grounding=0.0), progress=False)  # another recipe must not resume this one


def test_training_needs_no_attention_mask():
    """Training runs without an attention mask (train.py, for speed): with the padding at the end of each row and
    causal attention, every real token's hidden states and the loss are what the mask would give."""
    model_cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, position_hidden=32)
    model = testbed_model.TestbedModel.create(model_cfg, seed=0)
    batch = training_batch(model, TrainConfig(batch_size=3, per_type=1, model=model_cfg), step=2_000)
    real = batch["attention_mask"].bool()
    assert not real.all()  # rows of different lengths: there is padding the mask would hide
    with torch.no_grad():
        masked = model.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"], output_hidden_states=True)
        unmasked = model.llm(inputs_embeds=batch["inputs_embeds"], labels=batch["labels"], output_hidden_states=True)
    torch.testing.assert_close(unmasked.loss, masked.loss)
    for with_mask, without in zip(masked.hidden_states, unmasked.hidden_states, strict=True):
        torch.testing.assert_close(without[real], with_mask[real])


@pytest.mark.parametrize("num_layers", [4, 5])
def test_a_grown_model_starts_as_its_source(num_layers):
    """grow_in_depth spreads the source's layers over the new depth, each followed by zero-branch copies: the
    grown model computes exactly what its source does (train.grow_in_depth)."""
    from adatoken.testbed.train import grow_in_depth

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    source = testbed_model.TestbedModel.create(cfg, seed=3).eval()
    grown = grow_in_depth(source, TrainConfig(model=dataclasses.replace(cfg, num_layers=num_layers))).eval()
    assert len(grown.llm.model.layers) == num_layers
    inputs = source.build_inputs(load_split("test", num_scenes=1)[:2])
    with torch.no_grad():
        expected = source.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
        logits = grown.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="growing only adds layers"):
        grow_in_depth(grown, TrainConfig(model=cfg))
