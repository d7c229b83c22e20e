"""LLaVA-3D's LLM in miniature on its own stack (transformers 4.37.2), and inputs built the way LLaVA-3D's
`prepare_inputs_labels_for_multimodal` builds them. No downloads."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adatoken.core import models

TINY = models.SHAPES["tiny-6l"].config  # the sizes tests/ uses: vocab 96, hidden 64, 6 layers, 4 heads, no GQA
VOCAB = TINY["vocab_size"]
PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX: the one input id the spatial tokens replace


class LlavaLlamaConfig(LlamaConfig):
    model_type = "llava_llama"  # what LLaVA-3D checkpoints declare


class LlavaLlamaForCausalLM(LlamaForCausalLM):
    """LLaVA-3D's LLM as adatoken sees it: a LlamaForCausalLM whose config says llava_llama; its vision
    tower and 3D encoder run before the LLM and hand it `inputs_embeds`."""

    config_class = LlavaLlamaConfig


def build_model(attn: str = "eager", seed: int = 0) -> LlavaLlamaForCausalLM:
    """Vicuna's shape in miniature: multi-head attention (no GQA), 4,096 positions (a full 2,560-token scene)."""
    torch.manual_seed(seed)
    config = LlavaLlamaConfig(**{**TINY, "max_position_embeddings": 4096}, attn_implementation=attn)
    model = LlavaLlamaForCausalLM(config).eval()
    expected = {"eager": "LlamaAttention", "sdpa": "LlamaSdpaAttention"}[attn]  # 4.37 picks the class per layer
    assert type(model.model.layers[0].self_attn).__name__ == expected
    return model


def make_prompt(system: int = 12, prompt: int = 10, seed: int = 0) -> torch.Tensor:
    """input_ids [1, S] as LLaVA-3D tokenizes a question: system | <image> placeholder | prompt."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(1, VOCAB, (system,), generator=g), torch.tensor([PLACEHOLDER]),
                      torch.randint(1, VOCAB, (prompt,), generator=g)])[None]


def llava3d_inputs(model, ids: torch.Tensor, num_spatial: int, seed: int = 0):
    """(inputs_embeds [1, S-1+N, D], spatial mask [1, S-1+N]) for one sample, as LLaVA-3D builds them:
    the placeholder replaced by N 3D patch features; the mask from its position and N."""
    g = torch.Generator().manual_seed(seed + 1)
    at = int((ids[0] == PLACEHOLDER).nonzero())
    text = model.get_input_embeddings()(ids[0].clamp(min=0)).detach()
    features = torch.randn(num_spatial, text.shape[-1], generator=g)
    embeds = torch.cat([text[:at], features, text[at + 1:]])[None]
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    mask[0, at:at + num_spatial] = True
    return embeds, mask


# ----- LLaVA-3D's public interface, reproduced (ZCMax/LLaVA-3D @ 91d979dc, read, not copied) ---------------------
IGNORE_INDEX = -100
LOC_TOKEN_INDEX = -300  # a click prompt <boxes>: one token, replaced one for one (llava/constants.py:24-25)


class LlavaLlama3D(LlamaForCausalLM):
    """A small model with LLaVA-3D's interface as its code defines it (llava/model/language_model/llava_llama.py
    and llava/model/llava_arch.py): `forward` and `generate` take images (RGB views), depths, poses,
    intrinsics and clicks, `generate` refuses inputs_embeds and prepares its inputs itself, and
    `prepare_inputs_labels_for_multimodal` replaces the image placeholder by the scene's features and each
    click placeholder (LOC_TOKEN_INDEX, a `<boxes>` in the prompt) by its click's prompt feature, strips and
    re-pads by `config.tokenizer_padding_side`, and returns (None, position_ids, attention_mask,
    past_key_values, inputs_embeds, labels) with None where the caller gave None. The scene path in
    miniature: every pixel back-projected with its depth, intrinsics and camera pose to a 3D point, pooled
    into voxels (so scenes give different numbers of spatial tokens), each voxel's mean colour and centre
    projected to the hidden size (LLaVA-3D adds a 3D position embedding to 2D patch features). Clicks are
    [num_clicks, 3] points (a box's centre) for the whole batch, taken in order by the batch's click
    placeholders (llava_arch.py:237-241, 276-324), each encoded by a small MLP as LLaVA-3D's PromptEncoder
    does (multimodal_encoder/video_encoder.py:10-23, position_encodings.py:244-253: Linear, LayerNorm,
    ReLU, Linear to the hidden size)."""

    config_class = LlavaLlamaConfig
    VOXEL = 0.5

    def __init__(self, config):
        super().__init__(config)
        self.voxel_features = torch.nn.Linear(6, config.hidden_size)
        hidden = config.hidden_size
        self.prompt_encoder = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.LayerNorm(hidden),
                                                  torch.nn.ReLU(), torch.nn.Linear(hidden, hidden))

    def get_prompt_encoder(self):
        return self.prompt_encoder

    def encode_prompts(self, clicks):
        return self.get_prompt_encoder()(clicks.to(self.prompt_encoder[0].weight.dtype))  # [num_clicks, hidden]

    def encode_rgbd_videos(self, views, depths, poses, intrinsics) -> list[torch.Tensor]:
        scenes = []
        # per scene: rgb [V, 3, H, W], depth [V, H, W], pose [V, 4, 4] camera to world, K [V, 3, 3]
        for rgb, depth, pose, K in zip(views, depths, poses, intrinsics):
            rgb, depth, pose, K = rgb.float(), depth.float(), pose.float(), K.float()  # geometry in fp32
            h, w = depth.shape[-2:]
            v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                  indexing="ij")
            pixels = torch.stack((u, v, torch.ones_like(u)), -1).reshape(-1, 3)  # [H*W, 3]
            camera = (torch.linalg.inv(K) @ pixels.T)[None] * depth.reshape(len(depth), 1, -1)  # [V, 3, H*W]
            world = (pose[:, :3, :3] @ camera + pose[:, :3, 3:]).transpose(1, 2).reshape(-1, 3)
            colour = rgb.reshape(len(rgb), 3, -1).transpose(1, 2).reshape(-1, 3)
            _, voxel = torch.unique(torch.floor(world / self.VOXEL), dim=0, return_inverse=True)
            count = torch.zeros(int(voxel.max()) + 1).index_add_(0, voxel, torch.ones(len(voxel)))
            pooled = torch.zeros(len(count), 6).index_add_(0, voxel, torch.cat((colour, world), 1)) / count[:, None]
            scenes.append(self.voxel_features(pooled.to(self.voxel_features.weight.dtype)))
        return scenes

    def prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask, past_key_values, labels,
                                             images, depths, poses, intrinsics, lengths=None, clicks=None,
                                             image_sizes=None):
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        features = self.encode_rgbd_videos(images, depths, poses, intrinsics)
        prompts = self.encode_prompts(images[0].new_zeros((0, 3)) if clicks is None else clicks)
        given_mask, given_positions, given_labels = attention_mask, position_ids, labels
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        rows, row_labels, next_image, next_prompt = [], [], 0, 0
        for b in range(len(input_ids)):
            ids, lab = input_ids[b][real[b]], labels[b][real[b]]
            parts, part_labels, start = [], [], 0
            for at in ((ids == PLACEHOLDER) | (ids == LOC_TOKEN_INDEX)).nonzero().flatten().tolist():
                if ids[at] == PLACEHOLDER:  # images in batch order, clicks in the order their placeholders come
                    special, next_image = features[next_image], next_image + 1
                else:  # one token: the prompt encoder's feature of the next click
                    special, next_prompt = prompts[next_prompt][None], next_prompt + 1
                parts += [self.get_input_embeddings()(ids[start:at].clamp(min=0)), special]
                part_labels += [lab[start:at], torch.full((len(special),), IGNORE_INDEX)]
                start = at + 1
            parts.append(self.get_input_embeddings()(ids[start:].clamp(min=0)))
            part_labels.append(lab[start:])
            rows.append(torch.cat(parts))
            row_labels.append(torch.cat(part_labels))
        width = max(len(r) for r in rows)
        left = getattr(self.config, "tokenizer_padding_side", "right") == "left"
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        new_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        new_positions = torch.zeros(len(rows), width, dtype=torch.long)
        new_labels = torch.full((len(rows), width), IGNORE_INDEX)
        for b, (row, lab) in enumerate(zip(rows, row_labels)):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            embeds[b, span], new_mask[b, span], new_labels[b, span] = row, True, lab
            new_positions[b, span] = torch.arange(len(row))
        return (None, None if given_positions is None else new_positions,
                None if given_mask is None else new_mask.to(given_mask.dtype), past_key_values, embeds,
                None if given_labels is None else new_labels)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                images=None, depths=None, poses=None, intrinsics=None, lengths=None, clicks=None, image_sizes=None,
                return_dict=None):
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels = \
                self.prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask, past_key_values,
                                                          labels, images, depths, poses, intrinsics, lengths, clicks)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=return_dict)

    @torch.no_grad()
    def generate(self, inputs=None, images=None, depths=None, poses=None, intrinsics=None, lengths=None, clicks=None,
                 image_sizes=None, **kwargs):
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")
        if images is not None:
            inputs, position_ids, attention_mask, _, inputs_embeds, _ = self.prepare_inputs_labels_for_multimodal(
                inputs, position_ids, attention_mask, None, None, images, depths, poses, intrinsics, lengths, clicks)
        else:
            inputs_embeds = self.get_input_embeddings()(inputs)
        return super().generate(position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                **kwargs)


def build_3d_model(padding_side: str = "left", attn: str = "sdpa", seed: int = 0) -> LlavaLlama3D:
    torch.manual_seed(seed)
    config = LlavaLlamaConfig(**{**TINY, "max_position_embeddings": 4096}, attn_implementation=attn,
                              tokenizer_padding_side=padding_side)
    return LlavaLlama3D(config).eval()


def rgbd_scene(seed: int, views: int = 2, size: int = 12):
    """(images [V, 3, H, W], depths [V, H, W], poses [V, 4, 4], intrinsics [V, 3, 3]) of a random room."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(views, 3, size, size, generator=g)
    depths = 1.0 + 3.0 * torch.rand(views, size, size, generator=g)
    poses = torch.eye(4).repeat(views, 1, 1)
    poses[:, :3, 3] = torch.rand(views, 3, generator=g) * 4
    intrinsics = torch.tensor([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1.0]]).repeat(views, 1, 1)
    return images, depths, poses, intrinsics


# ----- a LLaVA-3D checkpoint and evaluation folder in miniature, for `adatoken eval --model llava3d` -------------
WORDS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions. USER: ASSISTANT: what colour is the chair "
         "how many tables are there where is lamp red blue two one The related object located at . Describe in "
         "detail. a next to brown cabinet corner of room").split()
# LLaVA-3D's Scan2Cap prompt (llava-3d-scan2cap_val.json's form; docs/fintune_custom_data.md, the README's demo)
CAPTION_PROMPT = "<video>\nThe related object is located at <boxes>. Describe the object in detail."
CAPTIONS = ("a red chair next to the table", "a brown cabinet in the corner of the room")


def write_llava3d_workspace(root: Path, num_scenes: int = 4) -> Path:
    """root/llava3d-tiny (the stand-in saved with a word-level tokenizer, as LLaVA-3D's builder loads a checkpoint),
    root/videos/scannet/sceneXXXX_00/scene.pt (llava_package's scene format), LLaVA-3D-format question and
    answer files, root/questions.json and root/answers.json, and a Scan2Cap file in LLaVA-3D's format,
    root/scan2cap.json (one object a scene, its box [cx, cy, cz, dx, dy, dz] with centres of 4+ decimals so that
    LLaVA-3D's rounding of a click to 3 shows). Returns the checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    checkpoint = root / "llava3d-tiny"
    model = build_3d_model(padding_side="left")
    model.config.mm_use_im_start_end = False
    model.save_pretrained(checkpoint)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= model.config.vocab_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(checkpoint)
    questions, answers, captions = [], [], []
    for i in range(num_scenes):
        scene = root / "videos" / "scannet" / f"scene{i:04d}_00"
        scene.mkdir(parents=True, exist_ok=True)
        torch.save(rgbd_scene(seed=i, views=2, size=10), scene / "scene.pt")  # voxels: different token counts
        questions.append({"question_id": f"q{i}", "video": f"scannet/scene{i:04d}_00",
                          "text": ["what colour is the chair", "how many tables are there"][i % 2]})
        answers.append({"question_id": f"q{i}", "text": ["red", "two"][i % 2]})
        box = [1.23456 + i, -0.54321, 0.0123456, 0.5, 0.6, 0.7]
        captions.append({"id": f"c{i}", "video": f"scannet/scene{i:04d}_00", "target": {"boxes": [box]},
                         "conversations": [{"from": "human", "value": CAPTION_PROMPT, "boxes_seq": [[0]]},
                                           {"from": "gpt", "value": CAPTIONS[i % 2]}]})
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "scan2cap.json").write_text(json.dumps(captions))
    (root / "answers.json").write_text(json.dumps(answers))
    return checkpoint


if __name__ == "__main__":  # python tests_legacy/llava3d_models.py FOLDER: the workspace docs/families.md evaluates
    print(write_llava3d_workspace(Path(sys.argv[1])))
