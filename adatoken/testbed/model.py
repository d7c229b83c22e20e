"""The testbed model: a spatial encoder feeding a plain `transformers.LlamaForCausalLM` through inputs_embeds.

Layout of every sequence, as in LLaVA-3D: `<s> system prompt | spatial tokens | USER: question ASSISTANT:`
then the answer. The encoder is LLaVA-3D's learned half: a linear projection of the pooled patch
feature plus a 2-layer MLP embedding of the pooled 3D point (and of its random Fourier features). The
LLM is an ordinary Hugging Face decoder, so pruning hooks and `generate` treat it like any LLaVA-style model.

Checkpoint folder (flat): config.json, generation_config.json, model.safetensors (the LLM, via
save_pretrained), encoder.safetensors, locator.safetensors (the grounding decoder, locator.py; checkpoints from
before it have none), tokenizer.json, testbed.json (encoder and spatial settings).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adatoken.testbed.locator import Locator
from adatoken.testbed.referring import CLICK, LOCATION, coordinates
from adatoken.testbed.scenes import CLASS_NAMES, COLOURS
from adatoken.testbed.spatial import (
    SURFACE_CLASSES,
    SpatialConfig,
    SpatialTokens,
    spatial_codes,
    spatial_tokens_for_seed,
)
from adatoken.testbed.tokenizer import build_tokenizer, dialogue_ids, load_tokenizer, system_ids

SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoint"
POSITION_CENTRE, POSITION_SCALE = 2.5, 2.0  # metres: rooms span about 0..7 m, so MLP inputs sit near [-1, 2]


def scaled_position(points: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Metres -> the position MLP's input scale (also the grounding heads' target scale)."""
    return (points - POSITION_CENTRE) / POSITION_SCALE


FREQUENCY_STD = 4.0  # per scaled unit: cos(w . d) averaged over w falls to 1/e at |d| ~ 0.7 m
# Word embeddings start at unit scale per component (not Llama's 0.02): in a small model trained from scratch,
# 0.02 makes every token's own embedding smaller than the first attention layer's update, so the question
# words are washed out by the average of hundreds of spatial tokens and the model learns slowly, if at all.
# (An untied LM head keeps the small init, so its first logits are near uniform; a tied one: TIED_HEAD_SCALE.)
WORD_EMBED_STD = 1.0
# With the head tied to unit-scale embeddings a logit is ~sqrt(hidden) at init; the final norm starts small
# so the first logits are near uniform.
TIED_HEAD_SCALE = 0.1


@dataclass(frozen=True)
class ModelConfig:
    # Six layers: the depth that a 45-minute CPU budget can train (see copy_heads). The runtime never prunes
    # layer 0, and FastV, PyramidDrop and schedules with first_layer=2 keep layer 1 too, so on six layers a mean
    # spatial retention below 1/3 cannot be reached; the eval runner says so rather than run them.
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 384
    position_hidden: int = 64  # width of the 3D position MLP
    # Random Fourier features of the 3D point feed the position MLP with the point itself (0: the point only).
    # They are there so that attention can find what is near an object, which relation questions ask (see
    # SpatialEncoder); alone, without the grounding heads (grounding.py), they did not make relations learnable.
    position_frequencies: int = 32
    aligned_projector: bool = True  # start the projector at stage-1 alignment (see align_projector)
    tie_embeddings: bool = True  # LM head = word embeddings: a copied word embedding is already its own logit
    # Spatial tokens are ordered by voxel, not by anything a sequence position means; a large RoPE base keeps
    # most rotary frequencies nearly still over the ~550-token sequence, so content can match content across it
    # (at 10,000 and head_dim 32 only a few dimensions per head are usable across a few hundred tokens).
    rope_theta: float = 1e8
    init_std: float | None = None  # of the LLM's weights; None: 1/sqrt(hidden) (Llama's 0.02 suits hidden ~4096)
    copy_init: float = 0.5  # initial strength of every head's "copy what you attend to" (see copy_heads)

    def llama_config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=1024, rope_theta=self.rope_theta,
            initializer_range=self.init_std or self.hidden_size ** -0.5, tie_word_embeddings=self.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
        )


class SpatialEncoder(nn.Module):
    """Pooled patch feature -> LLM embedding: linear projection + learned 3D position embedding (LLaVA-3D),
    RMS-normalised so spatial tokens enter the decoder at the scale of word embeddings (see WORD_EMBED_STD)."""

    def __init__(self, feature_dim: int, hidden_size: int, position_hidden: int, position_frequencies: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, hidden_size)
        # Fixed random frequencies (a buffer, saved with the weights): cos/sin(w . p) make "near in space" a dot
        # product, cos(w . (p - q)) summed over w, which attention computes directly (random Fourier features).
        self.register_buffer("frequencies", torch.randn(3, position_frequencies) * FREQUENCY_STD)
        self.position_mlp = nn.Sequential(nn.Linear(3 + 2 * position_frequencies, position_hidden), nn.ReLU(),
                                          nn.Linear(position_hidden, hidden_size))
        self.norm = nn.RMSNorm(hidden_size)
        # The position embedding starts at zero and grows as training finds use for it, so early on a token
        # is what it shows (class, colour), not a random position vector of the same size.
        nn.init.zeros_(self.position_mlp[-1].weight)
        nn.init.zeros_(self.position_mlp[-1].bias)

    def position(self, points: torch.Tensor) -> torch.Tensor:
        """The learned 3D position embedding of metre points [..., 3]."""
        p = scaled_position(points)
        angles = p @ self.frequencies
        return self.position_mlp(torch.cat([p, torch.cos(angles), torch.sin(angles)], -1))

    def forward(self, features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.norm(self.feature_proj(features) + self.position(points))

    def click(self, word: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """A click prompt: the click word's embedding plus the point's position embedding, normalised as spatial
        tokens are (LLaVA-3D encodes clicks with the 3D position encoding of its spatial tokens)."""
        return self.norm(word + self.position(points))


@torch.no_grad()
def align_projector(encoder: SpatialEncoder, llm: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                    spatial_config: SpatialConfig) -> None:
    """Set the feature projection to the least-squares map from each class and colour code of the simulated
    vision encoder to the word embedding of its name (floor/wall/ceiling and parts map to zero).

    LLaVA trains its projector first, alone, to put visual features where the LLM's words are (stage-1
    alignment) and starts from a pretrained LLM. A from-scratch model on a CPU budget cannot afford either, and
    without them it spends thousands of steps before attention finds the tokens that match a question word.
    Starting where stage-1 alignment ends lets one generic "match the word, copy the attribute" circuit serve
    every class and colour; all weights are still trained afterwards."""
    codes = spatial_codes(spatial_config)
    embed = llm.get_input_embeddings().weight
    word = lambda name: embed[tokenizer.convert_tokens_to_ids(name)]  # noqa: E731
    zero = torch.zeros_like(embed[0])
    sources = [codes["class"], codes["colour"], codes["part"]]
    targets = [word(c) if c in CLASS_NAMES else zero for c in SURFACE_CLASSES] + [word(c) for c in COLOURS]
    targets += [zero] * len(codes["part"])
    source = torch.from_numpy(np.concatenate(sources)).float()  # [num_codes, feature_dim]
    target = torch.stack(targets)  # [num_codes, hidden]
    encoder.feature_proj.weight.copy_((torch.linalg.pinv(source) @ target).T)
    encoder.feature_proj.bias.zero_()


@torch.no_grad()
def copy_heads(llm: LlamaForCausalLM, strength: float) -> None:
    """Start every attention head as "attend to tokens like me and copy what they are": k_proj = q_proj (scores
    favour similar tokens) and o_proj = `strength` * v_proj^T (adds a copy of what was attended to); the MLPs'
    residual branches start at zero.

    A pretrained LLM brings such copying heads; a from-scratch one has to find them, and finding them is a long
    plateau. Reading a colour off the one spatial token of its class (the caption turn), batch 16: a 2-layer model
    stayed at chance for 320 steps from Llama's init with zero-initialised branches, and was right 79 % of the
    time after 180 steps from this one. Deeper models plateau longer even so: 6 layers left chance at ~170
    steps, 12 and 24 layers had not by 180 and 160. Every weight is trained afterwards."""
    for layer in llm.model.layers:
        attn = layer.self_attn
        attn.k_proj.weight.copy_(attn.q_proj.weight)
        attn.o_proj.weight.copy_(attn.v_proj.weight.T * strength)
        nn.init.zeros_(layer.mlp.down_proj.weight)


class TestbedModel(nn.Module):
    """The testbed 3D LMM. `.llm` is the LlamaForCausalLM, `.encoder` the spatial encoder, `.tokenizer` the
    word-level tokenizer, `.locator` the grounding decoder (None in checkpoints from before it). Samples are
    anything with `scene_seed` and `question` (e.g. data.QASample)."""

    def __init__(self, llm: LlamaForCausalLM, encoder: SpatialEncoder, tokenizer: PreTrainedTokenizerFast,
                 model_config: ModelConfig, spatial_config: SpatialConfig, locator: Locator | None = None):
        super().__init__()
        self.llm, self.encoder, self.tokenizer, self.locator = llm, encoder, tokenizer, locator
        self.model_config, self.spatial_config = model_config, spatial_config

    @classmethod
    def create(cls, model_config: ModelConfig = ModelConfig(), spatial_config: SpatialConfig = SpatialConfig(),
               seed: int = 0) -> "TestbedModel":
        """A freshly initialised (untrained) model; weights depend only on `seed`."""
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        llm = LlamaForCausalLM(model_config.llama_config(tokenizer))
        nn.init.normal_(llm.get_input_embeddings().weight, std=WORD_EMBED_STD)
        copy_heads(llm, model_config.copy_init)
        if model_config.tie_embeddings:
            llm.tie_weights()
            nn.init.constant_(llm.model.norm.weight, TIED_HEAD_SCALE)
        encoder = SpatialEncoder(spatial_config.feature_dim, model_config.hidden_size, model_config.position_hidden,
                                 model_config.position_frequencies)
        if model_config.aligned_projector:
            align_projector(encoder, llm, tokenizer, spatial_config)
        locator = Locator(model_config.hidden_size, layers=(model_config.num_layers,))
        return cls(llm, encoder, tokenizer, model_config, spatial_config, locator)

    def spatial_tokens(self, sample) -> SpatialTokens:
        return spatial_tokens_for_seed(sample.scene_seed, self.spatial_config)

    def embed(self, spatial: Sequence[SpatialTokens], dialogues: Sequence[list[int]],
              answer_flags: Sequence[list[bool]] | None = None, padding_side: str = "left",
              clicks: Sequence[Sequence[Sequence[float]]] | None = None) -> dict[str, torch.Tensor]:
        """Embed `system | spatial | dialogue` per sample and pad to one length. With `answer_flags`, also
        returns `labels` (dialogue ids where the flag is set, -100 elsewhere) for training. `clicks`: per sample,
        the point of each click word in its dialogue, in order (referring.CLICK; SpatialEncoder.click)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        embed_tokens = self.llm.get_input_embeddings()
        device = embed_tokens.weight.device
        system = embed_tokens(torch.tensor(system_ids(self.tokenizer), device=device))
        rows, spatial_rows, label_rows = [], [], []
        for i, (tokens, dialogue) in enumerate(zip(spatial, dialogues, strict=True)):
            features = torch.from_numpy(tokens.features).to(device)
            points = torch.from_numpy(tokens.points).to(device)
            text = embed_tokens(torch.tensor(dialogue, dtype=torch.long, device=device))
            text = self._with_clicks(dialogue, text, clicks[i] if clicks is not None else ())
            rows.append(torch.cat([system, self.encoder(features, points), text]))
            spatial_rows.append([False] * len(system) + [True] * len(tokens) + [False] * len(dialogue))
            if answer_flags is not None:
                labels = [t if flag else -100 for t, flag in zip(dialogue, answer_flags[i], strict=True)]
                label_rows.append([-100] * (len(system) + len(tokens)) + labels)
        length = max(len(r) for r in rows)
        batch, hidden = len(rows), rows[0].shape[1]
        inputs_embeds = rows[0].new_zeros(batch, length, hidden)
        attention_mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        spatial_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        labels = torch.full((batch, length), -100, dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            inputs_embeds[b, span] = row
            attention_mask[b, span] = 1
            spatial_mask[b, span] = torch.tensor(spatial_rows[b], device=device)
            if answer_flags is not None:
                labels[b, span] = torch.tensor(label_rows[b], device=device)
        out = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "spatial_mask": spatial_mask}
        if answer_flags is not None:
            out["labels"] = labels
        return out

    def _with_clicks(self, dialogue: list[int], text: torch.Tensor, points: Sequence[Sequence[float]]) -> torch.Tensor:
        click_id = self.tokenizer.convert_tokens_to_ids(CLICK)
        at = [i for i, token in enumerate(dialogue) if token == click_id and click_id != self.tokenizer.unk_token_id]
        if len(at) != len(points):
            raise ValueError(f"a dialogue has {len(at)} click words ({CLICK!r}) but {len(points)} click points")
        if not at:
            return text
        where = torch.tensor(points, dtype=text.dtype, device=text.device)
        text = text.clone()
        text[at] = self.encoder.click(text[at], where)
        return text

    def build_inputs(self, samples: Sequence) -> dict[str, torch.Tensor]:
        """Left-padded prompts ending at `ASSISTANT:`: inputs_embeds [B,S,H], attention_mask [B,S] long,
        spatial_mask [B,S] bool (True exactly at the spatial tokens), spatial_points [B,S,3] float (each spatial
        token's 3D point, zero elsewhere: what `coverage` selects by)."""
        dialogues = [dialogue_ids(self.tokenizer, [(s.question, None)])[0] for s in samples]
        spatial = [self.spatial_tokens(s) for s in samples]
        clicks = [[s.click] if getattr(s, "click", None) is not None else [] for s in samples]
        inputs = self.embed(spatial, dialogues, padding_side="left", clicks=clicks)
        mask = inputs["spatial_mask"]
        points = torch.zeros(*mask.shape, 3, device=mask.device)
        for b, tokens in enumerate(spatial):
            points[b, mask[b]] = torch.from_numpy(tokens.points).to(mask.device)
        return {**inputs, "spatial_points": points}

    @torch.inference_mode()
    def answer(self, samples: Sequence, max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
        """Greedy answers, one per sample, generated through the pruning runtime's spatial-token context."""
        from adatoken.core.runtime import spatial_tokens

        answers = []
        for start in range(0, len(samples), batch_size):
            inputs = self.build_inputs(samples[start:start + batch_size])
            states, hooks = [], []
            if self.locator is not None:
                hooks = self._location_hooks(states)
            try:
                with spatial_tokens(self.llm, inputs["spatial_mask"], points=inputs["spatial_points"]):
                    out = self.llm.generate(
                        inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                        max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    )
            finally:
                for hook in hooks:
                    hook.remove()
            answers += [self._located(self.decode_answer(ids), inputs, b, states)
                        for b, ids in enumerate(out.tolist())]
        return answers

    def _location_hooks(self, states: list[dict[int, torch.Tensor]]) -> list:
        """Hooks that append, per generate step (one LLM forward), the last position's hidden states at the locator's
        layers ({hidden_states index: [B, H]}), each as it was last computed in that step (a method may run a module
        more than once in a prefill: DART runs the final norm again)."""
        def keep(layer):
            def hook(module, args, out):
                states[-1][layer] = (out[0] if isinstance(out, tuple) else out)[:, -1]
            return hook

        hooks = [self.llm.register_forward_pre_hook(lambda module, args: states.append({}))]
        for layer in self.locator.layers:
            # hidden_states[i] is layer i's output (i - 1 in model.layers), the last one the final norm's
            module = self.llm.model.norm if layer == self.model_config.num_layers else self.llm.model.layers[layer - 1]
            hooks.append(module.register_forward_hook(keep(layer)))
        return hooks

    def _located(self, answer: str, inputs: dict[str, torch.Tensor], b: int,
                 states: list[dict[int, torch.Tensor]]) -> str:
        """A location answer "loc cz dx dy dz" as the six coordinate words "cx cy cz dx dy dz", its x-y centre where
        the locator points with the location word's hidden states (the second generate step's, whose input is that
        word); any other answer as it is."""
        words = answer.split()
        if self.locator is None or len(words) != 5 or words[0] != LOCATION or len(states) < 2:
            return answer
        spatial = inputs["spatial_mask"][b]
        tokens, points = inputs["inputs_embeds"][b, spatial], inputs["spatial_points"][b, spatial]
        state = torch.cat([states[1][layer][b] for layer in self.locator.layers])
        x, y = self.locator.centre(state, tokens, points)
        return " ".join([coordinates([x, y]), *words[1:]])

    def decode_answer(self, ids: list[int]) -> str:
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: str | os.PathLike, extra: dict | None = None, half: bool = False) -> None:
        """Write the flat checkpoint folder (see module docstring). Files are written to a sibling temporary
        folder and renamed into place, so a kill never leaves a half-written file behind. With `half`, the LLM's
        weights are stored as float16 (config.json still says float32, and they load as float32)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.llm.save_pretrained(tmp)
        if half:
            weights = tmp / "model.safetensors"
            halved = {k: v.half() for k, v in load_file(str(weights)).items()}
            save_file(halved, str(weights), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in self.encoder.state_dict().items()}, str(tmp / "encoder.safetensors"))
        if self.locator is not None:
            weights = {k: v.contiguous() for k, v in self.locator.state_dict().items()}
            save_file(weights, str(tmp / "locator.safetensors"),
                      metadata={"layers": " ".join(map(str, self.locator.layers))})
        self.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {"model": asdict(self.model_config), "spatial": self.spatial_config.to_dict(), **(extra or {})}
        (tmp / "testbed.json").write_text(json.dumps(meta, indent=2) + "\n")
        path.mkdir(parents=True, exist_ok=True)
        for file in sorted(tmp.iterdir(),
                           key=lambda f: f.name == "testbed.json"):  # testbed.json last: it marks "complete"
            os.replace(file, path / file.name)
        tmp.rmdir()


def load_settings(path: str | os.PathLike | None = None) -> tuple[ModelConfig, SpatialConfig]:
    """The model and spatial settings of a testbed checkpoint folder (its testbed.json)."""
    path = Path(path) if path is not None else SHIPPED_CHECKPOINT
    if not (path / "testbed.json").is_file():
        hint = " (train one with `adatoken testbed train`)" if path == SHIPPED_CHECKPOINT else ""
        raise FileNotFoundError(f"no testbed checkpoint in {path}: testbed.json is missing{hint}")
    meta = json.loads((path / "testbed.json").read_text())
    model_config = ModelConfig(**{"position_frequencies": 0, **meta["model"]})  # older checkpoints had none
    return model_config, SpatialConfig(**meta["spatial"])


def load(path: str | os.PathLike | None = None) -> TestbedModel:
    """Load a testbed checkpoint folder (the one shipped in the package by default), offline, in eval mode."""
    path = Path(path) if path is not None else SHIPPED_CHECKPOINT
    model_config, spatial_config = load_settings(path)
    llm = LlamaForCausalLM.from_pretrained(path, local_files_only=True)
    encoder = SpatialEncoder(spatial_config.feature_dim, model_config.hidden_size, model_config.position_hidden,
                             model_config.position_frequencies)
    weights = load_file(str(path / "encoder.safetensors"))
    weights.setdefault("frequencies", torch.zeros(3, 0))  # checkpoints from before the Fourier features lack it
    encoder.load_state_dict(weights)
    locator = None
    if (path / "locator.safetensors").is_file():
        with safe_open(str(path / "locator.safetensors"), "pt") as f:  # the first ones read the final norm only
            layers = [int(i) for i in (f.metadata() or {}).get("layers", str(model_config.num_layers)).split()]
        locator = Locator(model_config.hidden_size, layers)
        locator.load_state_dict(load_file(str(path / "locator.safetensors")))
    model = TestbedModel(llm, encoder, load_tokenizer(str(path / "tokenizer.json")), model_config, spatial_config,
                         locator)
    return model.eval()
