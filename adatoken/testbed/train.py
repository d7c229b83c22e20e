"""Train the testbed from scratch on CPU: seeded, resumable, loss on answer tokens (plus grounding, below).

Each training sequence is one fresh train-split scene followed by a multi-turn dialogue about it
(a few questions of every type, shuffled), as LLaVA-3D's instruction data has several turns per
scene: the spatial tokens, the costly part of a sequence, are then paid once for about 14 answers. The
first turn has exactly the single-question layout used at test time. Besides the answers' cross-entropy,
two training-only linear heads regress object positions from hidden states (grounding.py). A batch is a
pure function of (seed, step), so a resumed run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from adatoken.core.artifacts import write_atomic
from adatoken.eval.metrics import exact_match
from adatoken.testbed.data import load_split, load_task_split, scene_questions, split_seeds, visible_objects
from adatoken.testbed.grounding import GROUNDING_HEADS, GroundingHeads, grounding_targets
from adatoken.testbed.locator import Locator
from adatoken.testbed.model import ModelConfig, TestbedModel, load
from adatoken.testbed.questions import DESCRIBE, QUESTION_TYPES, Question, describe
from adatoken.testbed.referring import (
    COORDINATE_WORDS,
    LOCATION,
    TASKS_3D,
    box_from_words,
    question_object,
    task_questions,
)
from adatoken.testbed.scenes import scene_for_seed
from adatoken.testbed.spatial import SpatialConfig, SpatialTokens, spatial_tokens_for_seed
from adatoken.testbed.tokenizer import build_tokenizer, dialogue_ids, system_ids


@dataclass
class TrainConfig:
    out: str = "runs/testbed"
    seed: int = 0
    steps: int = 1650
    batch_size: int = 16
    per_type: int = 2  # questions of each type per training dialogue
    geometry_per_type: int = 4  # relation and situated questions per dialogue: the types that need most practice
    # Training cycles through this many train scenes (fresh questions on every visit): their spatial tokens are
    # ray-cast once and cached, which removes a third of a short step's time. The split has 200,000.
    scene_pool: int = 2048
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    checkpoint_every: int = 25  # steps between resumable checkpoints (a kill loses at most this many)
    # Curriculum: attention finds the few tokens an answer needs much sooner when there are few others in the
    # sequence, and a step costs less. Until step `curriculum_objects` a scene is one token per object (its
    # centre voxel); then all object tokens (what geometry questions need: a lamp beside the bed's far end is
    # near the bed, not near its centre); from `curriculum_hold` the floor, wall and ceiling tokens come back at
    # random, linearly, until every token is there at hold + `curriculum_ramp`. The finished model always sees
    # complete scenes.
    curriculum_objects: int = 400
    curriculum_hold: int = 800
    curriculum_ramp: int = 250
    describe: bool = True  # end each dialogue with a dense caption turn (see questions.describe)
    # 3D grounding and object captioning turns per dialogue (referring.py), shuffled in with the questions; the
    # shipped 6-layer recipe had none, the 32-layer checkpoint learned them in a fine-tune (finetune_from).
    grounding_turns: int = 0
    captioning_turns: int = 0
    # Coordinate words (a grounding answer's box) are learned against a Gaussian over neighbouring values with this
    # standard deviation, in words (decimetres), instead of the one word: "31" for a true "32" is then nearly
    # right, not as wrong as "70", which is what the centre of a box needs to be learned to a decimetre. 0: one-hot.
    coordinate_sigma: float = 0.0
    # The hidden_states indices the grounding decoder's query reads at the location word (locator.py); empty: the
    # final norm's output alone, as the first decoder did. A model whose decoder reads other layers gets a fresh one.
    locator_layers: tuple[int, ...] = ()
    # Weight of the auxiliary 3D grounding losses (grounding.py; 0: none) and the hidden_states index each head
    # reads: object words after the first layer (where colour is fetched), answers after the fourth.
    grounding: float = 1.0
    grounding_layers: tuple[int, int] = (1, 4)
    eval_every: int = 500  # steps between greedy-answer accuracy checks on calib scenes (0: never)
    threads: int = 2
    export: str | None = None  # where the final model folder goes; default <out>/model
    # Grow a trained checkpoint folder in depth instead of training from scratch (see grow_in_depth); the shipped
    # 32-layer testbed grew from adatoken/testbed/checkpoint-6l.
    grow_from: str | None = None
    # Fine-tune a trained checkpoint folder at its own depth and settings (model/spatial are taken from it); its
    # vocabulary is extended with any words the current tokenizer has that it lacks (referring.py's tasks).
    finetune_from: str | None = None
    # Store the LLM's weights as float16 (they load into float32): halves the checkpoint, which a 32-layer testbed
    # needs to ship under 25 MB. The model train() returns is rounded the same way, so it is the one on disk.
    export_half: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def background_kept(cfg: TrainConfig, step: int) -> float:
    """Fraction of the floor, wall and ceiling tokens a training dialogue sees at `step` (see TrainConfig)."""
    return float(np.clip((step - cfg.curriculum_hold) / max(1, cfg.curriculum_ramp), 0.0, 1.0))


def curriculum_tokens(cfg: TrainConfig, step: int, tokens: SpatialTokens, rng: np.random.Generator) -> SpatialTokens:
    """The spatial tokens a training dialogue sees at `step`, in voxel order (see TrainConfig)."""
    if cfg.grow_from is not None or cfg.finetune_from is not None or step >= cfg.curriculum_hold + cfg.curriculum_ramp:
        return tokens  # a grown or fine-tuned model starts from one that reads complete scenes
    keep = background_kept(cfg, step)
    if keep >= 1.0:
        return tokens
    objects = tokens.centre | ((tokens.object_ids >= 0) & (step >= cfg.curriculum_objects))
    return tokens.select(objects | ((tokens.object_ids < 0) & (rng.random(len(tokens)) < keep)))


def training_batch(model: TestbedModel, cfg: TrainConfig, step: int) -> dict[str, torch.Tensor]:
    """Right-padded dialogues for `step` (padding at the end keeps every sample's positions at 0.., as
    generate's left padding + attention-mask positions do), with the grounding heads' targets: for each head,
    `<head>_rows`/`<head>_cols` index the batch and `<head>_positions` are the floor positions there."""
    seeds = split_seeds("train", cfg.scene_pool)
    per_type = {t: cfg.geometry_per_type if t in ("relation", "situated") else cfg.per_type for t in QUESTION_TYPES}
    spatial, dialogues, flags, clicks = [], [], [], []
    grounding = {head: ([], [], []) for head in GROUNDING_HEADS}  # rows, cols, positions
    located = ([], [], [])  # per location word: batch row, its column, the columns of its object's spatial tokens
    for b in range(cfg.batch_size):
        scene_seed = seeds[(step * cfg.batch_size + b) % len(seeds)]
        rng = np.random.default_rng([cfg.seed, step, b])
        tokens = spatial_tokens_for_seed(scene_seed, cfg.spatial)
        scene, visible = scene_for_seed(scene_seed), visible_objects(tokens)
        questions = scene_questions(scene_seed, rng, per_type, cfg.spatial)
        if cfg.grounding_turns or cfg.captioning_turns:
            questions += task_questions(scene, visible, rng, {"grounding": cfg.grounding_turns,
                                                              "captioning": cfg.captioning_turns})
            questions = [questions[i] for i in rng.permutation(len(questions))]
        turns = [(q.question, q.answer) for q in questions]
        if cfg.describe:  # last, so that no question can read its answer off the caption
            turns.append((DESCRIBE, describe(scene, visible)))
        ids, is_answer = dialogue_ids(model.tokenizer, turns)
        seen = curriculum_tokens(cfg, step, tokens, rng)
        spatial.append(seen)
        dialogues.append(ids)
        flags.append(is_answer)
        clicks.append([q.click for q in questions if q.click is not None])  # in turn order, as the click words
        system = len(system_ids(model.tokenizer))
        offset = system + len(seen)  # where the dialogue starts in the padded row
        for at, object_id in location_words(questions, ids, is_answer, model.tokenizer):
            located[0].append(b)
            located[1].append(offset + at)
            located[2].append(system + np.flatnonzero(seen.object_ids == object_id))
        for head, (indices, positions) in grounding_targets(scene, visible, questions, ids, is_answer,
                                                            model.tokenizer).items():
            rows, cols, floor = grounding[head]
            rows += [b] * len(indices)
            cols += [offset + i for i in indices]
            floor += positions
    batch = model.embed(spatial, dialogues, flags, padding_side="right", clicks=clicks)
    batch["locator_rows"] = torch.tensor(located[0], dtype=torch.long)
    batch["locator_cols"] = torch.tensor(located[1], dtype=torch.long)
    target = torch.zeros(len(located[0]), batch["inputs_embeds"].shape[1], dtype=torch.bool)
    for q, cols in enumerate(located[2]):
        target[q, torch.from_numpy(cols)] = True
    batch["locator_target"] = target
    for head, (rows, cols, floor) in grounding.items():
        batch[f"{head}_rows"] = torch.tensor(rows, dtype=torch.long)
        batch[f"{head}_cols"] = torch.tensor(cols, dtype=torch.long)
        batch[f"{head}_positions"] = torch.tensor(np.array(floor), dtype=torch.float32).reshape(-1, 2)
    return batch


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, coordinate_ids: torch.Tensor, sigma: float) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (answer) tokens, as LlamaForCausalLM's loss; where the label is a
    coordinate word and sigma > 0, the target is a Gaussian over the coordinate words around it (their ids are in
    value order, `coordinate_ids`) instead of the word alone."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    answer = labels != -100
    log_probs = torch.log_softmax(logits[answer], -1)
    targets = labels[answer]
    loss = -log_probs.gather(1, targets[:, None])[:, 0]
    coordinate_ids = coordinate_ids.to(targets.device)
    matches = targets[:, None] == coordinate_ids  # [N, 71]: which coordinate word each label is, if any
    coordinate = matches.any(1)
    if sigma > 0 and coordinate.any():
        value = matches[coordinate].float().argmax(1)
        steps = torch.arange(len(coordinate_ids), device=targets.device, dtype=torch.float32)
        soft = torch.softmax(-(steps - value[:, None]) ** 2 / (2 * sigma ** 2), -1)
        loss[coordinate] = -(soft * log_probs[coordinate][:, coordinate_ids]).sum(-1)
    return loss.mean()


def location_words(questions: list[Question], ids: list[int], is_answer: list[bool],
                   tokenizer: PreTrainedTokenizerFast) -> list[tuple[int, int]]:
    """(dialogue index, object id) of each grounding answer's location word (its first token): where the locator
    reads the hidden state and what it must point at."""
    starts = [i for i in range(len(ids)) if is_answer[i] and (i == 0 or not is_answer[i - 1])]
    location = tokenizer.convert_tokens_to_ids(LOCATION)
    return [(start, question_object(q)) for q, start in zip(questions, starts)
            if q.qtype == "grounding" and ids[start] == location]


def grown_layer_starts(depth: int, num_layers: int) -> list[int]:
    """Where each of a `depth`-layer model's layers lands in its `num_layers`-deep growth (spread evenly)."""
    return [i * num_layers // depth for i in range(depth)]


@torch.no_grad()
def grow_in_depth(source: TestbedModel, cfg: TrainConfig) -> TestbedModel:
    """`source` deepened to cfg.model.num_layers: its layers spread evenly over the new depth
    (grown_layer_starts), each followed by new layers that start as copies of it whose residual branches
    (o_proj, down_proj) are zero, so the grown model computes exactly what `source` does until training gives
    the new layers something to add.

    Why grow rather than train deep from scratch: a from-scratch model's plateau before its attention finds the
    tokens a question names lengthens with depth (copy_heads' docstring: 12 and 24 layers had not left chance
    when 6 had), and a step costs depth-fold more, so a 32-layer model trained like the 6-layer one would need
    several times the 2-hour CPU budget. The encoder and the vocabulary are the source's."""
    depth, num_layers = source.model_config.num_layers, cfg.model.num_layers
    if num_layers < depth:
        raise ValueError(f"cannot grow a {depth}-layer testbed to {num_layers} layers: growing only adds layers")
    for name in ("hidden_size", "num_heads", "intermediate_size", "position_hidden", "position_frequencies",
                 "tie_embeddings", "rope_theta"):
        if getattr(cfg.model, name) != getattr(source.model_config, name):
            raise ValueError(f"growing keeps every setting but the depth: model.{name} is "
                             f"{getattr(cfg.model, name)} here and {getattr(source.model_config, name)} in the source")
    if cfg.spatial != source.spatial_config:
        raise ValueError("growing keeps the source's spatial settings; give the same SpatialConfig")
    starts = grown_layer_starts(depth, num_layers) + [num_layers]
    torch.manual_seed(cfg.seed)
    llm = LlamaForCausalLM(cfg.model.llama_config(source.tokenizer))
    prefix = "model.layers."
    state = source.llm.state_dict()
    grown = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            first, end = starts[int(index)], starts[int(index) + 1]
            for position in range(first, end):
                zero = position > first and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
                grown[f"{prefix}{position}.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    llm.load_state_dict(grown, strict=not cfg.model.tie_embeddings)  # a tied head has no key of its own
    if cfg.model.tie_embeddings:
        llm.tie_weights()
    return TestbedModel(llm, source.encoder, source.tokenizer, cfg.model, source.spatial_config, source.locator)


@torch.no_grad()
def extend_vocabulary(source: TestbedModel, seed: int) -> TestbedModel:
    """`source` with the current tokenizer's vocabulary: its own words keep their ids and embeddings (the
    vocabulary only ever appends, tokenizer.vocabulary), new words get new rows. Coordinate words start as a
    smooth function of their value (random Fourier features of it, at the word embeddings' scale), so that with
    the tied head neighbouring coordinates start with similar logits; other new words start at random."""
    tokenizer = build_tokenizer()
    old, new = source.tokenizer.get_vocab(), tokenizer.get_vocab()
    if any(new.get(word) != index for word, index in old.items()):
        raise ValueError("the checkpoint's vocabulary is not a prefix of the current one; it cannot be extended")
    llm = source.llm
    embed = llm.get_input_embeddings().weight
    added = sorted(set(new) - set(old), key=new.get)
    rows = torch.randn(len(added), embed.shape[1], generator=torch.Generator().manual_seed(seed)) * embed.std()
    values = torch.tensor([float(w) if w in COORDINATE_WORDS else float("nan") for w in added])
    numeric = ~values.isnan()
    if numeric.any():
        g = torch.Generator().manual_seed(seed + 1)
        frequencies = torch.randn(embed.shape[1] // 2, generator=g) * 0.15  # per decimetre: smooth over ~1 m
        phases = torch.rand(embed.shape[1] // 2, generator=g) * 2 * math.pi
        angles = values[numeric, None] * frequencies + phases
        smooth = torch.cat([angles.cos(), angles.sin()], -1)
        rows[numeric] = smooth / smooth.std() * embed.std()
    grown = torch.cat([embed, rows.to(embed.dtype)])
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    llm.get_input_embeddings().weight.copy_(grown)
    if not source.model_config.tie_embeddings:
        llm.get_output_embeddings().weight[len(old):] = 0.0
    llm.config.vocab_size = len(tokenizer)
    return TestbedModel(llm, source.encoder, tokenizer, source.model_config, source.spatial_config, source.locator)


def _atomic_save(obj, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _resume(model: TestbedModel, heads: GroundingHeads, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
            state_path: Path) -> tuple[int, list]:
    if not state_path.is_file():
        return 0, []
    state = torch.load(state_path, weights_only=False)
    not_recipe = ("threads", "eval_every", "export", "out", "export_half")  # settings that do not change training
    # a state saved before a setting existed was trained with that setting's default
    saved = {k: v for k, v in {**asdict(TrainConfig()), **state["config"]}.items() if k not in not_recipe}
    wanted = {k: v for k, v in asdict(cfg).items() if k not in not_recipe}
    if saved != wanted:
        raise ValueError(f"{state_path} was written by a different training configuration; "
                         f"use another --out or delete it. saved={saved} wanted={wanted}")
    model.llm.load_state_dict(state["llm"])
    model.encoder.load_state_dict(state["encoder"])
    heads.load_state_dict(state["grounding"])
    if "locator" in state:  # states from before the grounding decoder have none
        model.locator.load_state_dict(state["locator"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["history"]


def calib_accuracy(model: TestbedModel, num_scenes: int = 20) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on the first calib scenes: overall and per question type."""
    samples = load_split("calib", num_scenes=num_scenes, cfg=model.spatial_config)
    model.eval()
    correct = [exact_match(a, s.answers) for a, s in zip(model.answer(samples), samples)]
    model.train()
    by_type = {t: float(np.mean([c for c, s in zip(correct, samples) if s.qtype == t])) for t in QUESTION_TYPES}
    return {"overall": float(np.mean(correct)), **by_type}


def calib_task_scores(model: TestbedModel, num_scenes: int = 20) -> dict[str, float]:
    """Greedy 3D grounding Acc@0.25 / Acc@0.5 and captioning exact match on the first calib scenes' task questions
    (two per scene each): how far a grounding fine-tune has got, logged beside calib_accuracy."""
    from adatoken.eval.boxes import box_iou

    model.eval()
    ious, exact = [], []
    for task in TASKS_3D:
        pairs = load_task_split("calib", task, num_scenes, cfg=model.spatial_config)
        answers = model.answer([sample for sample, _ in pairs], max_new_tokens=8)
        for (sample, question), answer in zip(pairs, answers, strict=True):
            if task == "captioning":
                exact.append(exact_match(answer, sample.answers))
                continue
            box, obj = box_from_words(answer), sample.scene.objects[question_object(question)]
            ious.append(0.0 if box is None else box_iou(box, [*obj.centre, *obj.size]))
    model.train()
    return {"grounding acc@0.25": float(np.mean(np.asarray(ious) >= 0.25)),
            "grounding acc@0.5": float(np.mean(np.asarray(ious) >= 0.5)), "captioning em": float(np.mean(exact))}


def train(cfg: TrainConfig, progress: bool = True) -> TestbedModel:
    """Train (or resume) into `cfg.out`; returns the trained model and exports it to `cfg.export`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)  # a library call must not leave the process's thread count changed


def _train(cfg: TrainConfig, progress: bool) -> TestbedModel:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    grounding_layers = cfg.grounding_layers
    if cfg.grow_from is not None and cfg.finetune_from is not None:
        raise ValueError("give grow_from or finetune_from, not both")
    if cfg.finetune_from is not None:
        source = load(cfg.finetune_from)
        if (source.model_config, source.spatial_config) != (cfg.model, cfg.spatial):
            raise ValueError(f"fine-tuning keeps the checkpoint's settings: pass its ModelConfig and SpatialConfig "
                             f"(from {cfg.finetune_from}/testbed.json)")
        model = extend_vocabulary(source, cfg.seed).train()
    elif cfg.grow_from is None:
        model = TestbedModel.create(cfg.model, cfg.spatial, seed=cfg.seed).train()
    else:
        source = load(cfg.grow_from)
        model = grow_in_depth(source, cfg).train()
        # grounding_layers are the source's hidden_states indices: moved to where its layers now start
        starts = grown_layer_starts(source.model_config.num_layers, cfg.model.num_layers) + [cfg.model.num_layers]
        grounding_layers = tuple(starts[h] for h in cfg.grounding_layers)
    heads = GroundingHeads(cfg.model.hidden_size, cfg.model.num_layers, *grounding_layers)  # not in the model
    locator_layers = cfg.locator_layers or (cfg.model.num_layers,)
    if not all(1 <= layer <= cfg.model.num_layers for layer in locator_layers):
        raise ValueError(f"locator_layers must be hidden_states indices in 1..{cfg.model.num_layers} (the model's "
                         f"depth; 0 would be the input embeddings), got {list(locator_layers)}")
    if cfg.grounding_turns and (model.locator is None or model.locator.layers != locator_layers):
        torch.manual_seed(cfg.seed)  # a model from before the grounding decoder, or one reading other layers
        model.locator = Locator(cfg.model.hidden_size, locator_layers)
    coordinate_ids = torch.tensor(model.tokenizer.convert_tokens_to_ids(list(COORDINATE_WORDS)))
    parameters = [*model.named_parameters(), *heads.named_parameters()]
    decay = [p for n, p in parameters if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in parameters if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    state_path, log_path = out / "state.pt", out / "train_log.jsonl"
    start, history = _resume(model, heads, optimizer, cfg, state_path)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="testbed train", disable=not progress)
    smoothed, started = None, time.time()
    for value in history:  # the running loss goes on across a resume, and a run resumed when done still reports it
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        batch = training_batch(model, cfg, step)
        # No attention mask: the padding is at the end of each row and attention is causal, so no real token can
        # see it anyway. Without a mask SDPA runs its causal kernel, which skips the upper triangle: a full-scene
        # step is about a third faster and its result unchanged (test_training_needs_no_attention_mask).
        outputs = model.llm(inputs_embeds=batch["inputs_embeds"],
                            output_hidden_states=cfg.grounding > 0 or len(batch["locator_rows"]) > 0)
        grounding = heads.loss(outputs.hidden_states, batch) if cfg.grounding > 0 else {}
        loss = answer_loss(outputs.logits, batch["labels"], coordinate_ids, cfg.coordinate_sigma)
        loss = loss + cfg.grounding * sum(grounding.values())
        if len(batch["locator_rows"]):  # the grounding decoder's own loss: point at each location word's object
            rows = batch["locator_rows"]
            grounding["locator"] = model.locator.loss(model.locator.read(outputs.hidden_states, rows,
                                                                         batch["locator_cols"]),
                                                      batch["inputs_embeds"][rows], batch["spatial_mask"][rows],
                                                      batch["locator_target"])
            loss = loss + grounding["locator"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in parameters], 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        history.append(loss.item())
        bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{learning_rate(cfg, step):.1e}")
        done = step + 1
        record = {"step": done, "loss": loss.item(), "smoothed": smoothed,
                  "grounding": {head: value.item() for head, value in grounding.items()},
                  "steps_per_s": (done - start) / (time.time() - started)}
        if cfg.eval_every and done % cfg.eval_every == 0:
            record["calib_accuracy"] = calib_accuracy(model)
            bar.write(f"step {done}: calib accuracy "
                      + " ".join(f"{k} {v:.2f}" for k, v in record["calib_accuracy"].items()))
            if cfg.grounding_turns or cfg.captioning_turns:
                record["calib_tasks"] = calib_task_scores(model)
                bar.write(f"step {done}: calib " + ", ".join(f"{k} {v:.2f}" for k, v in record["calib_tasks"].items()))
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _atomic_save({"step": done, "llm": model.llm.state_dict(), "encoder": model.encoder.state_dict(),
                          **({"locator": model.locator.state_dict()} if model.locator else {}),
                          "grounding": heads.state_dict(),
                          "optimizer": optimizer.state_dict(), "config": asdict(cfg), "history": history}, state_path)
    model.eval()
    info = {"train": {"steps": cfg.steps, "seed": cfg.seed, "batch_size": cfg.batch_size, "per_type": cfg.per_type,
                      "geometry_per_type": cfg.geometry_per_type, "lr": cfg.lr, "grounding": cfg.grounding,
                      "grow_from": cfg.grow_from, "finetune_from": cfg.finetune_from,
                      "grounding_turns": cfg.grounding_turns, "captioning_turns": cfg.captioning_turns,
                      "final_loss_smoothed": smoothed}}
    if cfg.export_half:
        with torch.no_grad():
            for parameter in model.llm.parameters():
                parameter.copy_(parameter.half().float())
    model.save(cfg.export or out / "model", extra=info, half=cfg.export_half)
    return model
