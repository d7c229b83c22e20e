"""Tiny random-weight models built from transformers configs (no downloads), and inputs for them.

Every decoder has the sizes of the named shape "tiny-6l" (adatoken.core.models: vocab 96, hidden 64,
6 layers, 4 heads); each family sets its own key/value heads and what makes it that family.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    CLIPImageProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import adatoken
from adatoken.calibration.flow import FlowSample
from adatoken.core import models
from invariants import grid_points

TEXT_KW = {k: v for k, v in models.SHAPES["tiny-6l"].config.items() if k != "num_key_value_heads"}
VOCAB = TEXT_KW["vocab_size"]
IMAGE_TOKEN = VOCAB - 1
FAMILIES = ["llama", "qwen2", "mistral", "llava"]
VIDEO_TOKEN, VISION_START, VISION_END = 94, 93, 92  # Qwen2-VL's markers around each image / video
# multimodal families whose inputs come from `vision_inputs` (pixels whose features fill the spatial tokens)
VISION_FAMILIES = ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)


def text_config(family: str):
    if family == "llama":
        return LlamaConfig(num_key_value_heads=4, **TEXT_KW)
    if family == "qwen2":  # GQA and q/k/v biases
        return Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **TEXT_KW)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **TEXT_KW)
    if family == "qwen3":  # GQA, per-head q/k norms, head_dim != hidden / heads
        return Qwen3Config(num_key_value_heads=2, head_dim=24, **TEXT_KW)
    raise ValueError(family)


def _vision_model(family: str):
    if family == "llava_next":  # anyres: a base 16px view and a 16x32 grid, with newline tokens
        config = LlavaNextConfig(vision_config=CLIP, text_config=text_config("llama").to_dict(),
                                 image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[16, 32]],
                                 vision_feature_layer=-1)
        return LlavaNextForConditionalGeneration(config)
    if family == "llava_onevision":  # Qwen2 inside
        config = LlavaOnevisionConfig(vision_config=CLIP, text_config=text_config("qwen2").to_dict(),
                                      image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                      image_grid_pinpoints=[[16, 32]], vision_feature_layer=-1,
                                      vision_feature_select_strategy="default")
        return LlavaOnevisionForConditionalGeneration(config)
    # Qwen2-VL / Qwen2.5-VL: multimodal RoPE with sections [2, 3, 3] of the 8 rotary pairs of a 16-dim head
    text = dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **TEXT_KW,
                rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))
    markers = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                   vision_end_token_id=VISION_END)
    patches = dict(num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, **patches)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **markers))
    if family == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=8,
                      fullatt_block_indexes=[0], **patches)
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **markers))
    raise ValueError(family)


def build_model(family: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    if family == "llava":
        config = LlavaConfig(vision_config=CLIP, text_config=text_config("llama").to_dict(),
                             image_token_id=IMAGE_TOKEN, vision_feature_layer=-1, projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(config)
    elif family in VISION_FAMILIES:
        model = _vision_model(family)
    else:
        model = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM,
                 "qwen3": Qwen3ForCausalLM}[family](text_config(family))
    model.set_attn_implementation(attn)
    return model.eval()


def make_prompt(num_spatial: int, system: int = 5, prompt: int = 7, seed: int = 0):
    """input_ids [1, S] laid out system | spatial | prompt, and the spatial mask."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, IMAGE_TOKEN - 1, (n,), generator=g)  # noqa: E731
    ids = torch.cat([text(system), torch.full((num_spatial,), IMAGE_TOKEN), text(prompt)])[None]
    return ids, ids == IMAGE_TOKEN


def image_tokens(model, ids: torch.Tensor, query_index=None):
    """adatoken.spatial_tokens over the image tokens of `ids`, with their 3D points."""
    spatial = ids == IMAGE_TOKEN
    return adatoken.spatial_tokens(model, spatial, query_index=query_index, points=grid_points(spatial))


def model_inputs(model, family: str, ids: torch.Tensor, attention_mask=None, seed: int = 0):
    """kwargs for model(...) / generate: Llava gets pixel values whose patches fill the image tokens;
    text families get inputs_embeds (the LLaVA-3D way) and must be wrapped in adatoken.spatial_tokens."""
    kwargs = {"attention_mask": attention_mask if attention_mask is not None else torch.ones_like(ids)}
    if family == "llava":
        g = torch.Generator().manual_seed(seed)
        kwargs["input_ids"] = ids
        kwargs["pixel_values"] = torch.randn(ids.shape[0], 3, 16, 16, generator=g)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        embeds = model.get_input_embeddings()(ids).detach()
        spatial = ids == IMAGE_TOKEN
        embeds[spatial] = torch.randn(int(spatial.sum()), embeds.shape[-1], generator=g)
        kwargs["inputs_embeds"] = embeds
    return kwargs


def vision_inputs(family: str, seed: int = 0, system: int = 5, prompt: int = 7) -> dict:
    """kwargs for model(...) / generate of a VISION_FAMILIES model: input ids laid out
    system | image [| video] | prompt, and pixels whose features fill those tokens exactly."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, VISION_END, (n,), generator=g)  # noqa: E731  (no marker ids)
    tokens = lambda token, n: torch.full((n,), token)  # noqa: E731
    if family == "llava_next":
        ids = torch.cat([text(system), tokens(IMAGE_TOKEN, 52), text(prompt)])
        pixels = dict(pixel_values=torch.randn(1, 3, 3, 16, 16, generator=g), image_sizes=torch.tensor([[16, 32]]))
    elif family == "llava_onevision":  # an image (52 tokens) and a 2-frame video (2x2 pooled per frame + newline)
        ids = torch.cat([text(system), tokens(IMAGE_TOKEN, 52), tokens(VIDEO_TOKEN, 9), text(prompt)])
        pixels = dict(pixel_values=torch.randn(1, 3, 3, 16, 16, generator=g), image_sizes=torch.tensor([[16, 32]]),
                      pixel_values_videos=torch.randn(1, 2, 3, 16, 16, generator=g))
    else:  # Qwen2-VL family: an 8x12-patch image (24 merged tokens) and a 2x4x4 video (8 tokens), each in markers
        ids = torch.cat([text(system), tokens(VISION_START, 1), tokens(IMAGE_TOKEN, 24), tokens(VISION_END, 1),
                         tokens(VISION_START, 1), tokens(VIDEO_TOKEN, 8), tokens(VISION_END, 1), text(prompt)])
        pixels = dict(pixel_values=torch.randn(96, 24, generator=g), image_grid_thw=torch.tensor([[1, 8, 12]]),
                      pixel_values_videos=torch.randn(32, 24, generator=g), video_grid_thw=torch.tensor([[2, 4, 4]]),
                      mm_token_type_ids=((ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int())[None])
    return dict(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), **pixels)


# --- calibration samples (test_flow.py, test_plots.py) -------------------------------------------------
NUM_SPATIAL, NUM_SYSTEM, NUM_PROMPT, NUM_ANSWER = 40, 5, 7, 6


def flow_sample(model, family: str, seed: int = 0, answer: bool = True) -> FlowSample:
    """system | 40 spatial | prompt | 6 answer tokens; query_index = the last prompt token."""
    ids, spatial = make_prompt(NUM_SPATIAL, system=NUM_SYSTEM, prompt=NUM_PROMPT, seed=seed)
    if answer:
        ids = torch.cat([ids, torch.randint(1, IMAGE_TOKEN - 1, (1, NUM_ANSWER))], 1)
        spatial = ids == IMAGE_TOKEN
    query = NUM_SYSTEM + NUM_SPATIAL + NUM_PROMPT - 1
    return FlowSample(model_inputs(model, family, ids, seed=seed), spatial, query if answer else None)


# ----- local image-text-to-text checkpoints, as `adatoken eval --model hf` loads them ---------------------------
# Each family's processor is built offline: a word-level tokenizer holding the family's special tokens at the ids its
# tiny model uses, the family's image processor sized so that a question image (20 x 24 px) becomes few image tokens,
# and a chat template in the family's format (written here, not the published one: these tokenizers split on
# whitespace only, so a newline in a template separates words and is otherwise lost).
CHECKPOINT_FAMILIES = ["llava", *VISION_FAMILIES]
WORDS = ["USER:", "ASSISTANT:", "what", "colour", "is", "the", "chair", "red", "blue", "how", "many", "two", "?"]
LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
MISTRAL_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% endif %}{% for c in m['content'] %}"
                    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                    "{% if m['role'] == 'user' %} [/INST]{% else %}</s>{% endif %}{% endfor %}")


def _qwen_template(image: str, system: bool) -> str:
    """ChatML, as Qwen2 writes it: every turn between <|im_start|>ROLE and <|im_end|>; Qwen2-VL adds a default
    system turn."""
    default = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
               "<|im_end|>\n{% endif %}") if system else ""
    return (default + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            f"{{% if c['type'] == 'image' %}}{image}{{% else %}}{{{{ c['text'] }}}}{{% endif %}}"
            "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_checkpoint(family: str, folder) -> None:
    """A random `family` model (CHECKPOINT_FAMILIES) of the tests' size and its processor, saved in `folder` as
    `save_pretrained` writes them. Image tokens per 20 x 24 question image: LLaVA-1.5 16 (CLIP at 16 px: 4 x 4
    patches); LLaVA-NeXT and OneVision 36 (the 16 px base view's 16, then the 16 x 32 tile grid's 4 x 8 features cut
    back to the image's aspect ratio, 4 x 4, with a newline token closing each row, 4); Qwen2-VL and 2.5-VL 30 (the
    image kept at its size: 10 x 12 patches of 2 px, merged 2 x 2)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    if family in ("llava", "llava_next"):
        llava = dict(patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        if family == "llava":
            tokenizer = _tokenizer(["<s>", "</s>", "<pad>"], WORDS, {"<image>": IMAGE_TOKEN})
            images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
            processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=LLAVA_TEMPLATE,
                                       **llava)
        else:  # LLaVA-NeXT's Mistral prompt ([INST] ... [/INST], the answer ends with </s>)
            tokenizer = _tokenizer(["<s>", "</s>", "<pad>"], WORDS + ["[INST]", "[/INST]"], {"<image>": IMAGE_TOKEN})
            images = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                             image_grid_pinpoints=[[16, 32]])
            processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer,
                                           chat_template=MISTRAL_TEMPLATE, **llava)
        processor.save_pretrained(folder)
    elif family in VISION_FAMILIES:
        chatml = ["<|im_start|>", "<|endoftext|>", "<|im_end|>"]
        words = WORDS + ["user", "assistant", "system", "You", "are", "a", "helpful", "assistant."]
        if family == "llava_onevision":  # Qwen2's ChatML with LLaVA's <image>
            tokenizer = _tokenizer(chatml, words, {"<image>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN})
            images = LlavaOnevisionImageProcessor(size={"height": 16, "width": 16}, image_grid_pinpoints=[[16, 32]])
            # a view's tokens: CLIP's 4 x 4 patches and its class token, which the "default" strategy drops
            _save_processor(folder, "LlavaOnevisionProcessor", images, tokenizer, _qwen_template("<image>\n", False),
                            num_image_tokens=17, vision_feature_select_strategy="default",
                            vision_aspect_ratio="anyres_max_9")
        else:
            markers = {"<|vision_end|>": VISION_END, "<|vision_start|>": VISION_START, "<|video_pad|>": VIDEO_TOKEN,
                       "<|image_pad|>": IMAGE_TOKEN}
            tokenizer = _tokenizer(chatml, words, markers)
            # the image kept at its size: at least 4 x 4 patches, at most 32 x 32 px (min_pixels / max_pixels)
            images = Qwen2VLImageProcessor(min_pixels=64, max_pixels=32 * 32, patch_size=2, merge_size=2,
                                           temporal_patch_size=2)
            name = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
            _save_processor(folder, name, images, tokenizer,
                            _qwen_template("<|vision_start|><|image_pad|><|vision_end|>", True))
    else:
        raise ValueError(f"no checkpoint for {family!r}; families: {CHECKPOINT_FAMILIES}")
    build_model(family, "sdpa").save_pretrained(folder)


def tiny_llava_checkpoint(folder) -> None:
    """The LLaVA-1.5 checkpoint (tiny_checkpoint("llava", folder)), which the README evaluates."""
    tiny_checkpoint("llava", folder)


def _tokenizer(specials: list[str], words: list[str], markers: dict[str, int]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: <unk> 0, then `specials` (beginning, end of text or turn,
    padding), `words`, filler words, and the multimodal `markers` at the ids the tiny models expect."""
    vocab = {"<unk>": 0, **{token: 1 + i for i, token in enumerate(specials)}}
    vocab.update({word: len(vocab) + i for i, word in enumerate(words)})
    vocab.update({f"w{i}": i for i in range(len(vocab), min(markers.values()))}, **markers)
    assert len(vocab) == VOCAB and sorted(vocab.values()) == list(range(VOCAB))
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    if specials[0] == "<s>":  # LLaMA / Mistral: <s> text </s>, padded with <pad>
        roles = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    else:  # Qwen2: no beginning token, <|im_end|> ends a turn, <|endoftext|> pads
        roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    names = {"<image>": "image_token", "<video>": "video_token", "<|image_pad|>": "image_token",
             "<|video_pad|>": "video_token", "<|vision_start|>": "vision_start_token",
             "<|vision_end|>": "vision_end_token"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **roles,
                                        extra_special_tokens={names[token]: token for token in markers})
    # the rest of the specials (<|im_start|>) are special too: whole tokens wherever they stand, skipped in decoding
    tokenizer.add_tokens([AddedToken(token, special=True) for token in specials], special_tokens=True)
    return tokenizer


def _save_processor(folder, name: str, images, tokenizer, template: str, **options) -> None:
    """A processor folder for a processor class `name` that also reads videos (LLaVA-OneVision, Qwen2-VL), written
    part by part: transformers 5 builds every video processor with torchvision, which these machines lack (its PyPI
    wheels need CUDA's torch), so the processor object cannot exist here to save itself. The image processor goes to
    preprocessor_config.json (as transformers 4 saved it; 5 reads it still), the tokenizer, chat template and the
    processor's options beside it; adatoken.eval.hf loads them back."""
    images.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(template)
    (Path(folder) / "processor_config.json").write_text(json.dumps({"processor_class": name, **options}, indent=2))


def question_file(folder, count: int = 6, questions: Sequence[str] = ("what colour is the chair ?",)):
    """An image-question JSONL (adatoken's format, docs/metrics.md) beside `count` random PNGs, asking `questions`
    in turn (prompts of several lengths make left-padded batches); returns its path."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append({"question_id": f"q{i}", "image": f"img{i}.png", "question": questions[i % len(questions)],
                      "answers": ["red"]})
    path = folder / "questions.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    return path


if __name__ == "__main__":  # python tests/tiny_models.py FOLDER: the checkpoint and questions the README evaluates
    root = Path(sys.argv[1])
    (root / "questions").mkdir(parents=True, exist_ok=True)
    tiny_checkpoint("llava", root / "tiny-llava")
    print(root / "tiny-llava", question_file(root / "questions"))
