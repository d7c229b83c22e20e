"""The testbed's 3D grounding and dense captioning tasks (adatoken/testbed/referring.py), their question sets in the
evaluation runner, and the report's Table-I columns."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from adatoken import prune, unprune
from adatoken.cli import main
from adatoken.eval.boxes import box_iou
from adatoken.eval.report import _task_scores
from adatoken.eval.runner import default_methods, sweep_configs
from adatoken.testbed.answerer import TestbedAnswerer, as_sample, load_testbed_task
from adatoken.testbed.data import load_split, split_seeds
from adatoken.testbed.locator import Locator
from adatoken.testbed.model import SHIPPED_CHECKPOINT as SHIPPED
from adatoken.testbed.model import ModelConfig, TestbedModel, load
from adatoken.testbed.questions import point_box_distance
from adatoken.testbed.referring import (
    CLICK,
    COORDINATE_WORDS,
    LOCATION,
    RELATION_MARGIN,
    box_from_words,
    box_words,
    captioning_questions,
    grounding_questions,
    location_words,
)
from adatoken.testbed.scenes import scene_for_seed
from adatoken.testbed.tokenizer import build_tokenizer, vocabulary
from adatoken.testbed.train import (
    TrainConfig,
    answer_loss,
    calib_task_scores,
    extend_vocabulary,
    train,
    training_batch,
)


def test_a_box_survives_its_words_to_the_nearest_decimetre():
    box = (0.81, 1.234, 0.0, 1.36, 1.77, 0.825)  # xmin, ymin, zmin, xmax, ymax, zmax
    assert box_words(box) == "11 15 4 6 5 8"  # centre (1.085, 1.502, 0.4125), size (0.55, 0.536, 0.825)
    assert box_from_words("11 15 4 6 5 8") == [1.1, 1.5, 0.4, 0.6, 0.5, 0.8]
    assert box_iou(box_from_words(box_words(box)), [1.085, 1.502, 0.4125, 0.55, 0.536, 0.825]) > 0.75
    for bad in ("8 12 0 14 18", "8 12 0 14 18 8 9", "8 12 zero 14 18 8", "8 12 0 14 18 71"):
        assert box_from_words(bad) is None, bad


def _resolve(scene, expression: str):
    """The objects an expression names, read independently of referring.py's construction."""
    words = expression.split()
    if "closest" in words:  # "{cls} closest to the {anchor}"
        cls, anchor_cls = words[0], words[-1]
        (anchor,) = [o for o in scene.objects if o.cls == anchor_cls]
        candidates = sorted((point_box_distance(anchor.centre, o.box), o.object_id)
                            for o in scene.objects if o.cls == cls)
        assert candidates[1][0] - candidates[0][0] >= RELATION_MARGIN  # the nearest wins clearly
        return [candidates[0][1]]
    if len(words) == 2:  # "{colour} {cls}"
        return [o.object_id for o in scene.objects if o.cls == words[1] and o.colour == words[0]]
    return [o.object_id for o in scene.objects if o.cls == words[0]]


def test_every_referring_expression_names_exactly_its_object():
    kinds = set()
    for seed in split_seeds("test", 40):
        scene = scene_for_seed(seed)
        for q in grounding_questions(scene):
            expression = q.question.removeprefix("Where is the ").removesuffix("?")
            assert _resolve(scene, expression) == [q.referents[-1]], q.question
            assert q.answer == location_words(scene.objects[q.referents[-1]].box)
            kinds.add("closest" if "closest" in expression else len(expression.split()))
    assert kinds == {1, 2, "closest"}  # class, colour + class, and relation expressions all occur


def test_captions_say_colour_class_and_the_clearly_nearest_object():
    for seed in split_seeds("test", 20):
        scene = scene_for_seed(seed)
        for q in captioning_questions(scene):
            obj = scene.objects[q.referents[0]]
            assert q.answer.startswith(f"{obj.colour} {obj.cls}")
            assert q.question == "Describe the clicked object." and np.allclose(q.click, obj.centre)
            if len(q.referents) == 2:
                assert q.answer.endswith(f"next to the {scene.objects[q.referents[1]].cls}")
            else:
                assert q.answer == f"{obj.colour} {obj.cls}"


def test_task_words_are_appended_to_the_shipped_vocabulary():
    shipped = load().tokenizer.get_vocab()
    words = vocabulary()
    assert sorted(shipped, key=shipped.get) == words[:len(shipped)]  # old ids unchanged: a checkpoint can fine-tune
    tokenizer = build_tokenizer()
    for task in ("grounding", "captioning"):
        for record in load_testbed_task(task, num_scenes=10):
            answers = [box_words(_corners(record.extra["box"])), location_words(_corners(record.extra["box"]))] \
                if task == "grounding" else record.answers
            ids = tokenizer(f"{record.question} {' '.join(answers)}", add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids


def _corners(box):
    centre, size = np.array(box[:3]), np.array(box[3:])
    return [*(centre - size / 2), *(centre + size / 2)]


def test_extending_the_vocabulary_keeps_what_the_model_computed():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    model = TestbedModel.create(cfg, seed=1).eval()
    # a model made before the task words existed: the QA vocabulary only, the words before "clicked" (the first
    # task word: they are appended in sorted order, then the coordinate words)
    qa_size = vocabulary().index("clicked")
    model.llm.resize_token_embeddings(qa_size, mean_resizing=False)
    backend = json.loads(model.tokenizer.backend_tokenizer.to_str())
    backend["model"]["vocab"] = {w: i for w, i in backend["model"]["vocab"].items() if i < qa_size}
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
                                              bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    inputs = model.build_inputs(load_split("test", num_scenes=1)[:2])
    with torch.no_grad():
        before = model.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
        extended = extend_vocabulary(model, seed=0).eval()
        after = extended.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
    assert after.shape[-1] == len(vocabulary()) and len(extended.tokenizer) == len(vocabulary())
    torch.testing.assert_close(after[..., :qa_size], before)
    rows = extended.llm.get_input_embeddings().weight[qa_size:]
    coordinate = rows[-72:-1]  # "0" .. "70" (then the location word): neighbours start alike, far values do not
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(coordinate[30], coordinate[31], dim=0) > 0.9 > cosine(coordinate[30], coordinate[60], dim=0)


def test_a_click_puts_its_point_into_the_click_word():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    model = TestbedModel.create(cfg, seed=0).eval()
    torch.nn.init.normal_(model.encoder.position_mlp[-1].weight)  # a trained-like position embedding, not zero
    (record,) = load_testbed_task("captioning", num_scenes=1)[:1]
    sample = as_sample(record)
    moved = dataclasses.replace(sample, click=(sample.click[0] + 2.0, *sample.click[1:]))
    here, there = (model.build_inputs([s])["inputs_embeds"][0] for s in (sample, moved))
    click = model.tokenizer.convert_tokens_to_ids("clicked")
    dialogue = model.tokenizer(record.question, add_special_tokens=False)["input_ids"]
    at = here.shape[0] - (len(dialogue) + 1) + dialogue.index(click) - 1  # "USER:" before, "ASSISTANT:" after
    assert not torch.allclose(here[at], there[at])  # the click word's embedding depends on the point
    same = torch.ones(here.shape[0], dtype=torch.bool)
    same[at] = False
    torch.testing.assert_close(here[same], there[same])  # and nothing else does
    with pytest.raises(ValueError, match="1 click words .* but 0 click points"):
        model.build_inputs([dataclasses.replace(sample, click=None)])


def test_training_dialogues_carry_grounding_and_captioning_turns():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    model = TestbedModel.create(cfg, seed=0)
    train_cfg = TrainConfig(batch_size=2, per_type=1, grounding_turns=2, captioning_turns=2, model=cfg)
    batch = training_batch(model, train_cfg, step=5_000)
    answers = model.tokenizer.decode([t for t in batch["labels"][0].tolist() if t >= 0])
    assert sum(a.split()[:1] == [LOCATION] for a in answers.split("</s>")) == 2  # two location answers
    assert len(batch["answer_rows"]) >= 2 * 4  # the answer head regresses each task question's object
    # the locator reads each location word and must point at its object's spatial tokens, and only those
    assert len(batch["locator_rows"]) == 2 * 2
    location = model.tokenizer.convert_tokens_to_ids(LOCATION)
    for q, (row, col) in enumerate(zip(batch["locator_rows"], batch["locator_cols"])):
        assert batch["labels"][row, col] == location  # the location word itself (its hidden state asks)
        target = batch["locator_target"][q]
        assert target.any() and not (target & ~batch["spatial_mask"][row]).any()


def test_the_answer_loss_is_the_models_own_and_soft_only_on_coordinate_words():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    model = TestbedModel.create(cfg, seed=0)
    batch = training_batch(model, TrainConfig(batch_size=2, per_type=1, grounding_turns=2, model=cfg), step=3)
    ids = torch.tensor(model.tokenizer.convert_tokens_to_ids(list(COORDINATE_WORDS)))
    with torch.no_grad():
        out = model.llm(inputs_embeds=batch["inputs_embeds"], labels=batch["labels"])
    torch.testing.assert_close(answer_loss(out.logits, batch["labels"], ids, 0.0), out.loss)  # sigma 0: HF's loss
    # one position, one label: the soft loss of "32" is lowest when the model says 32, rises with the distance
    # to it, and does not care for a non-coordinate label
    labels = torch.tensor([[-100, int(ids[32])]])
    loss = {}
    for said in (32, 33, 40):
        logits = torch.full((1, 2, len(model.tokenizer)), -20.0)
        logits[0, 0, ids[said]] = 20.0
        loss[said] = answer_loss(logits, labels, ids, 1.5).item()
    assert loss[32] < loss[33] < loss[40]
    word = torch.tensor([[-100, model.tokenizer.convert_tokens_to_ids("red")]])
    torch.testing.assert_close(answer_loss(logits, word, ids, 1.5), answer_loss(logits, word, ids, 0.0))


def test_calib_task_scores_score_boxes_by_iou_and_captions_by_exact_match(monkeypatch):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    model = TestbedModel.create(cfg, seed=0)
    def right(samples, max_new_tokens):  # the true boxes to the nearest decimetre, the reference captions
        boxes = {(s.scene_seed, q.question): box_words(s.scene.objects[q.referents[-1]].box)
                 for s in samples if s.qtype == "grounding" for q in grounding_questions(s.scene)}
        return [boxes[s.scene_seed, s.question] if s.qtype == "grounding" else s.answers[0] for s in samples]

    monkeypatch.setattr(model, "answer", right)
    right = calib_task_scores(model, num_scenes=3)
    assert right["captioning em"] == 1.0 and right["grounding acc@0.25"] == 1.0 >= right["grounding acc@0.5"] > 0.5
    monkeypatch.setattr(model, "answer", lambda samples, max_new_tokens: ["0 0 0 1 1 1"] * len(samples))
    assert calib_task_scores(model, num_scenes=3) == {"grounding acc@0.25": 0.0, "grounding acc@0.5": 0.0,
                                                     "captioning em": 0.0}


def test_the_locator_points_at_the_best_tokens_and_boxes_their_extent():
    locator = Locator(hidden_size=4, layers=(1,), key_size=2)
    with torch.no_grad():  # score = the token's first feature (times the state's): a pointer we can predict
        for linear in (locator.query, locator.key):
            linear.weight.zero_()
            linear.bias.zero_()
        locator.query.bias[0] = 1.0
        locator.key.weight[0, 0] = 1.0
    tokens = torch.zeros(6, 4)
    tokens[[1, 3], 0] = 10.0  # two tokens of the object, equally likely; one a little less (within a quarter)
    tokens[4, 0] = 10.0 - 0.5 * math.sqrt(2)
    tokens[5, 0] = 10.0 - 0.1  # as likely, but metres away from them: another object the pointer is unsure of
    points = torch.tensor([[0.0, 0, 0], [1.0, 2.0, 0], [9.0, 9, 0], [1.3, 2.1, 0], [1.1, 2.4, 0], [4.0, 4.0, 0]])
    assert locator.centre(torch.zeros(4), tokens, points) == pytest.approx((1.15, 2.2))
    mask = torch.ones(1, 6, dtype=torch.bool)
    target = torch.zeros(1, 6, dtype=torch.bool)
    target[0, [1, 3, 4]] = True
    pointed = locator.loss(torch.zeros(1, 4), tokens[None], mask, target)
    tokens[2, 0] = 20.0  # a token off the object now takes the pointer: the loss says so
    assert locator.loss(torch.zeros(1, 4), tokens[None], mask, target) > pointed + 1.0


def test_a_location_answer_is_boxed_from_the_location_words_hidden_state(monkeypatch, tmp_path):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    model = TestbedModel.create(cfg, seed=0).eval()
    torch.manual_seed(0)
    model.locator = Locator(cfg.hidden_size, layers=(1, 2))  # the first layer's output and the final norm's
    with torch.no_grad():  # a pointer that follows the state closely, so that another state points elsewhere
        model.locator.query.weight.mul_(50.0)
    model.save(tmp_path / "model")
    loaded = load(tmp_path / "model")  # the locator is saved and loaded with the model, layers and all
    assert loaded.locator.layers == (1, 2)
    torch.testing.assert_close(loaded.locator.state_dict(), model.locator.state_dict())
    samples = [as_sample(r) for r in load_testbed_task("grounding", num_scenes=1)]
    monkeypatch.setattr(model, "decode_answer", lambda ids: f"{LOCATION} 4 5 5 9")  # whatever was generated
    answers = model.answer(samples, max_new_tokens=3)
    # by hand: the generated first token appended to the prompt; its last hidden state is what points
    inputs = model.build_inputs(samples)
    with torch.no_grad():
        first = model.llm(**{k: inputs[k] for k in ("inputs_embeds", "attention_mask")}).logits[:, -1].argmax(-1)
        embeds = torch.cat([inputs["inputs_embeds"], model.llm.get_input_embeddings()(first)[:, None]], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(samples), 1, dtype=torch.long)], 1)
        hidden = model.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
    for b, answer in enumerate(answers):
        spatial = inputs["spatial_mask"][b]
        state = torch.cat([hidden[1][b, -1], hidden[2][b, -1]])
        x, y = model.locator.centre(state, inputs["inputs_embeds"][b, spatial], inputs["spatial_points"][b, spatial])
        assert answer == f"{round(x * 10)} {round(y * 10)} 4 5 5 9"
    assert load(SHIPPED).locator.layers == (20, 32)  # the shipped checkpoint grounds, reading layers 20 and 32


def test_every_method_keeping_every_token_boxes_as_unpruned(monkeypatch):
    """The location word's state is the second generate step's, however often a method runs the final norm (DART
    runs it in the prefill too)."""
    cfg = ModelConfig(hidden_size=32, num_layers=8, num_heads=2, intermediate_size=64, position_hidden=16)
    model = TestbedModel.create(cfg, seed=0).eval()
    torch.manual_seed(0)
    model.locator = Locator(cfg.hidden_size, layers=(4, 8))  # a layer that pruning reaches, and the final norm
    with torch.no_grad():  # a pointer that follows the state closely, so that another state points elsewhere
        model.locator.query.weight.mul_(50.0)
    monkeypatch.setattr(model, "decode_answer", lambda ids: f"{LOCATION} 4 5 5 9")
    samples = [as_sample(r) for r in load_testbed_task("grounding", num_scenes=2)][:3]
    unpruned = model.answer(samples, max_new_tokens=3)
    def norm_again(module, args, output):  # as DART's prefill runs the final norm on a layer's output
        model.llm.model.norm(output[0] if isinstance(output, tuple) else output)

    extra_norm = model.llm.model.layers[0].register_forward_hook(norm_again)
    try:
        assert model.answer(samples, max_new_tokens=3) == unpruned
    finally:
        extra_norm.remove()
    for config in sweep_configs(default_methods(), [1.0], cfg.num_layers, None):
        if config.prune is None:
            continue
        prune(model.llm, config.prune)
        try:
            assert model.answer(samples, max_new_tokens=3) == unpruned, config.key
        finally:
            unprune(model.llm)


def test_the_locator_trains_saves_and_resumes_with_the_model(tmp_path):
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, position_hidden=16)
    train_cfg = TrainConfig(out=str(tmp_path), steps=3, batch_size=2, per_type=1, grounding_turns=2, warmup=1,
                            eval_every=0, checkpoint_every=3, threads=1, model=cfg, grounding_layers=(1, 2),
                            locator_layers=(1, 2))
    torch.manual_seed(train_cfg.seed)
    untrained = Locator(cfg.hidden_size, layers=(1, 2))  # the one train() makes: it reads other layers than create's
    trained = train(train_cfg, progress=False)
    assert trained.locator.layers == (1, 2)
    assert not torch.allclose(trained.locator.query.weight, untrained.query.weight)  # its loss reached it
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(record["grounding"]["locator"] > 0 for record in log)
    torch.testing.assert_close(load(tmp_path / "model").locator.state_dict(), trained.locator.state_dict())
    first = Locator(cfg.hidden_size, layers=(2,)).state_dict()  # the first decoders: the final norm's state alone,
    save_file(first, str(tmp_path / "model" / "locator.safetensors"))  # saved with no layers in the metadata
    assert load(tmp_path / "model").locator.layers == (2,)
    with pytest.raises(ValueError, match=r"hidden_states indices in 1..2 .* got \[0, 2\]"):
        train(dataclasses.replace(train_cfg, out=str(tmp_path / "other"), locator_layers=(0, 2)), progress=False)
    info = json.loads((tmp_path / "model" / "testbed.json").read_text())["train"]
    resumed = train(train_cfg, progress=False)  # every step done: the locator comes back from state.pt
    assert json.loads((tmp_path / "model" / "testbed.json").read_text())["train"] == info  # its loss too
    torch.testing.assert_close(resumed.locator.state_dict(), trained.locator.state_dict())


def test_testbed_task_sets_are_big_enough_and_boxed():
    grounding, captioning = load_testbed_task("grounding"), load_testbed_task("captioning")
    assert len(grounding) >= 500 and len({(r.scene_id, r.extra["object_id"]) for r in captioning}) >= 300
    for record in grounding[:50]:
        obj = scene_for_seed(record.extra["scene_seed"]).objects[record.extra["object_id"]]
        np.testing.assert_allclose(record.extra["box"], [*obj.centre, *obj.size])
        assert record.extra["subset"] == ("unique" if scene_for_seed(record.extra["scene_seed"]).count(obj.cls) == 1
                                          else "multiple")
    assert {r.extra["subset"] for r in grounding} == {"unique", "multiple"}


def test_the_testbed_answerer_turns_coordinate_words_into_a_box():
    class Words:
        llm = None
        tokenizer = build_tokenizer()  # the task vocabulary: a model trained on the tasks

        def answer(self, samples, max_new_tokens, batch_size):
            return ["11 15 4 6 5 8", "8 12", "red chair"][:len(samples)]

    records = load_testbed_task("grounding", num_scenes=1)[:2] + load_testbed_task("captioning", num_scenes=1)[:1]
    assert TestbedAnswerer(Words()).answer(records, 8) == ["[1.10, 1.50, 0.40, 0.60, 0.50, 0.80]", "8 12", "red chair"]


def test_report_scores_boxes_and_captions_as_table_one():
    unit = [0.5, 0.5, 0.5, 1.0, 1.0, 1.0]
    rows = [  # IoU 1, 1/3 (half the box shifted out) and no box
        {"qtype": "grounding", "prediction": "[0.5, 0.5, 0.5, 1, 1, 1]", "box": unit, "subset": "unique"},
        {"qtype": "grounding", "prediction": "[1.0, 0.5, 0.5, 1, 1, 1]", "box": unit, "subset": "multiple"},
        {"qtype": "grounding", "prediction": "0 0", "box": unit, "subset": "multiple"},
    ]
    scores = _task_scores(rows)["grounding"]
    assert scores["acc@0.25"].value == pytest.approx(2 / 3) and scores["acc@0.5"].value == pytest.approx(1 / 3)
    assert scores["unique acc@0.5"].value == 1.0 and scores["multiple acc@0.25"].value == 0.5
    captions = [  # the same caption twice: for the given object, and with a box that misses it (IoU 1/3)
        {"qtype": "captioning", "prediction": "red chair next to the bed", "box": unit,
         "references": ["red chair next to the bed"]},
        {"qtype": "captioning", "prediction": "red chair next to the bed [1.0, 0.5, 0.5, 1, 1, 1]", "box": unit,
         "references": ["red chair next to the bed"]},
    ]
    captioning = _task_scores(captions)["captioning"]
    assert captioning["bleu_4@0.25"].value == pytest.approx(captioning["bleu_4@0.5"].value * 2)
    assert captioning["bleu_4@0.5"].value > 0.4


def test_eval_runs_the_testbed_grounding_set(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--dataset", "testbed-grounding", "--methods", "none", "fastv", "--retentions", "0.4",
            "--limit", "4", "--batch-size", "4", "--max-new-tokens", "7", "--out", str(out), "--no-progress"]
    cfg = ModelConfig(hidden_size=32, num_layers=8, num_heads=2, intermediate_size=64, position_hidden=16)
    TestbedModel.create(cfg, seed=0).save(tmp_path / "untrained")  # the task vocabulary, random weights
    # a checkpoint trained before the tasks existed (the QA vocabulary only) is refused, not scored 0 in silence
    shutil.copytree(tmp_path / "untrained", tmp_path / "qa-only")
    tokenizer = json.loads((tmp_path / "qa-only" / "tokenizer.json").read_text())
    del tokenizer["model"]["vocab"][CLICK]
    (tmp_path / "qa-only" / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main([*args, "--checkpoint", str(tmp_path / "qa-only")]) == 2
    assert "was not trained on grounding" in capsys.readouterr().err
    assert main([*args, "--checkpoint", str(tmp_path / "untrained"), "--fresh"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["skipped"] for row in report["rows"]] == [None, None]
    assert all(set(row["grounding"]) >= {"acc@0.25", "acc@0.5"} for row in report["rows"])
    markdown = (out / "report.md").read_text()
    assert "## 3D grounding (n=4)" in markdown
    # boxes never equal the reference text: the main table shows Acc@0.5, not a column of EM 0
    assert "| grounding Acc@0.5 % |" in markdown and "EM %" not in markdown and "EM by question type" not in markdown
    predictions = [json.loads(line) for line in (out / "predictions" / "rank0.jsonl").open()]
    assert len(predictions) == 8 and all(len(p["box"]) == 6 and p["subset"] for p in predictions)
