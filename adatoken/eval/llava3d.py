"""`adatoken eval --model llava3d --checkpoint PATH`: a LLaVA-3D checkpoint answering ScanQA, SQA3D or LLaVA-3D's own
question files, or captioning the objects of LLaVA-3D's Scan2Cap file (`--dataset llava3d-scan2cap`), through the
user's installed LLaVA-3D package (ZCMax/LLaVA-3D; we never import it elsewhere).

Everything is done as its evaluation scripts do it (llava/eval/model_scanqa.py and model_sqa3d.py @ 91d979dc,
the two are identical): the checkpoint loads with `llava.model.builder.load_pretrained_model` (:171, bfloat16), the
prompt is the `llava_v1` conversation with the image token before the question (`<im_start><image><im_end>` when
`config.mm_use_im_start_end`, :49-57), tokenised by `tokenizer_image_token` (:59), the scene is read from
`{video folder}/{video}` by `process_videos(..., mode='random', text=question)` (:61-67) and cast to the
model's dtype (:69-72), and `generate` samples with temperature 0.2, top_p None, one beam (:75-88, their
defaults :112-114), at most 512 new tokens; the answer is the decoded output, stripped (:90).

Dense captioning is prompted as its llava/eval/model_scan2cap.py does (@ 91d979dc): the record's question as
written in the file, its `<video>` replaced by the image token with nothing prepended (:47-54), the object's box
given as a `<boxes>` placeholder whose click is the box's centre rounded to 3 decimals (:57-69), the prompt
tokenised by `tokenizer_special_token` (image and box placeholders, :78), and `generate(..., clicks=)` (:95-109;
the clicks cast like the scene, :88-92). A batch's clicks are one [num_clicks, 3] tensor in the order of its
`<boxes>` placeholders, as LLaVA-3D's input preparation takes them (llava/model/llava_arch.py:237-241,
290-324) and its training collator builds them (llava/train/train.py:911-916).

Sampling makes one run differ from the next, so each batch is seeded from its first question id (frame sampling
included): every method sees the same draws, and a rerun gives the same answers. `greedy=True` decodes greedily.
Scenes: a LLaVA-3D question file names each scene's folder (`video`, e.g. scannet/scene0011_00); ScanQA and
SQA3D files name the scene id, read as `scannet/{scene_id}` as LLaVA-3D lays its data out. The prompt is the
record's text: LLaVA-3D's own files (`--dataset llava3d`) hold the exact prompts its published numbers used.

Pruning needs nothing more: `adatoken.prune` finds the scene's tokens in LLaVA-3D's own input preparation (a
click's placeholder becomes one token there, never pruned).
"""
from __future__ import annotations

import importlib
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from adatoken.eval.datasets import QARecord
from adatoken.eval.runner import register_answerer

# LLaVA-3D's evaluation defaults (llava/eval/model_scanqa.py:86, 112-114).
TEMPERATURE, TOP_P, NUM_BEAMS, MAX_NEW_TOKENS = 0.2, None, 1, 512
CONV_MODE = "llava_v1"
VIDEO_FOLDER = "playground/data/LLaVA-3D-Pretrain"  # the scripts' default --video-folder


def _llava():
    """LLaVA-3D's modules, from the user's environment."""
    names = ("constants", "conversation", "mm_utils", "model.builder")
    try:
        return {name: importlib.import_module(f"llava.{name}") for name in names}
    except ImportError as exc:
        raise ValueError(f"--model llava3d runs LLaVA-3D through its own package, not importable here ({exc}): "
                         "install it into this environment (git clone https://github.com/ZCMax/LLaVA-3D && "
                         "pip install -e LLaVA-3D), then rerun") from None


class LLaVA3DAnswerer:
    batch_size = 1  # LLaVA-3D's scripts answer one question at a time
    max_new_tokens = MAX_NEW_TOKENS

    def __init__(self, llava: dict, tokenizer, model, processor, device: torch.device, *,
                 video_folder: str | Path = VIDEO_FOLDER, conv_mode: str = CONV_MODE, greedy: bool = False):
        self.llava, self.tokenizer, self.llm, self.processor, self.device = llava, tokenizer, model, processor, device
        self.video_folder = Path(video_folder)
        if not self.video_folder.is_dir():
            raise ValueError(f"--video-folder {self.video_folder}: no such folder; pass the folder LLaVA-3D's "
                             f"evaluation reads scenes from (its scripts' default: {VIDEO_FOLDER})")
        templates = llava["conversation"].conv_templates
        if conv_mode not in templates:
            raise ValueError(f"--conv-mode {conv_mode!r} is not one of LLaVA-3D's templates: {sorted(templates)}")
        self.conv_mode, self.greedy = conv_mode, greedy
        self.decoding = ("greedy" if greedy else f"sampled at temperature {TEMPERATURE}, top_p {TOP_P}, "
                         f"{NUM_BEAMS} beam (LLaVA-3D's evaluation), seeded per batch") + \
            f", conversation {conv_mode}"

    def _input_ids(self, question: str) -> torch.Tensor:
        constants = self.llava["constants"]
        image = constants.DEFAULT_IMAGE_TOKEN
        if getattr(self.llm.config, "mm_use_im_start_end", False):
            image = constants.DEFAULT_IM_START_TOKEN + image + constants.DEFAULT_IM_END_TOKEN
        conv = self.llava["conversation"].conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], image + "\n" + question)
        conv.append_message(conv.roles[1], None)
        return self.llava["mm_utils"].tokenizer_image_token(conv.get_prompt(), self.tokenizer,
                                                            constants.IMAGE_TOKEN_INDEX, return_tensors="pt")

    def _caption_input_ids(self, record: QARecord) -> tuple[torch.Tensor, list[list[float]]]:
        """A dense captioning prompt as model_scan2cap.py builds it (:47-78), and the click of its `<boxes>`."""
        constants = self.llava["constants"]
        question = record.question.replace(constants.DEFAULT_VIDEO_TOKEN, constants.DEFAULT_IMAGE_TOKEN)
        if question.count(constants.DEFAULT_IMAGE_TOKEN) != 1 or question.count(constants.DEFAULT_BOX_TOKEN) != 1:
            raise ValueError(f"question {record.question_id!r}: LLaVA-3D's Scan2Cap prompts hold the scene as one "
                             f"{constants.DEFAULT_VIDEO_TOKEN} and the object as one {constants.DEFAULT_BOX_TOKEN} "
                             f"(llava/eval/model_scan2cap.py:54-69); this one is {record.question!r}")
        conv = self.llava["conversation"].conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        input_ids = self.llava["mm_utils"].tokenizer_special_token(conv.get_prompt(), self.tokenizer,
                                                                   return_tensors="pt")
        return input_ids, [[round(float(coord), 3) for coord in record.extra["box"][:3]]]

    def _video(self, record: QARecord) -> str:
        path = self.video_folder / (record.extra.get("video") or f"scannet/{record.scene_id}")
        if not path.exists():
            raise ValueError(f"question {record.question_id!r}: scene {path} not found under --video-folder "
                             f"{self.video_folder}")
        return str(path)

    def answer(self, records: Sequence[QARecord], max_new_tokens: int) -> list[str]:
        from transformers import set_seed

        set_seed(zlib.crc32(records[0].question_id.encode()))  # frame sampling and decoding, the same for every method
        # a record with a box is an object to caption (LLaVA-3D's Scan2Cap file), any other a question
        prompts = [self._caption_input_ids(r) if "box" in r.extra else (self._input_ids(r.question), [])
                   for r in records]
        rows = [ids for ids, _ in prompts]
        clicks = [click for _, record_clicks in prompts for click in record_clicks]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):  # left-padded: LLaVA-3D re-pads by config.tokenizer_padding_side itself
            input_ids[b, width - len(row):], attention_mask[b, width - len(row):] = row, 1
        # one call a scene, as the scripts make it, each with its question (the processor may select frames by it)
        videos = [self.llava["mm_utils"].process_videos(self._video(r), self.processor["video"], mode="random",
                                                        device=self.device, text=r.question) for r in records]
        scene = {name: torch.cat([v[name] for v in videos]).to(self.device, dtype=self.llm.dtype)
                 for name in ("images", "depths", "poses", "intrinsics")}
        if clicks:  # the box placeholders' points, cast like the scene (model_scan2cap.py:88-92)
            scene["clicks"] = torch.tensor(clicks).to(self.device, dtype=self.llm.dtype)
        sampling = {"do_sample": False} if self.greedy else \
            {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P}
        with torch.inference_mode():
            out = self.llm.generate(input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                    **scene, image_sizes=None, num_beams=NUM_BEAMS, max_new_tokens=max_new_tokens,
                                    use_cache=True, pad_token_id=pad, **sampling)
        # LLaVA-3D's generate starts from embeddings, so its output is the new tokens only.
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def load_answerer(checkpoint: str | None, device: torch.device, *, video_folder: str | Path = VIDEO_FOLDER,
                  conv_mode: str = CONV_MODE, greedy: bool = False) -> tuple[LLaVA3DAnswerer, Path]:
    """The checkpoint, its tokenizer and its scene processor, loaded by LLaVA-3D's own builder on `device`."""
    if checkpoint is None:
        raise ValueError("--model llava3d needs --checkpoint PATH: a local LLaVA-3D checkpoint folder")
    path = Path(checkpoint).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"--checkpoint {path}: no config.json there; expected a LLaVA-3D checkpoint folder")
    llava = _llava()
    name = llava["mm_utils"].get_model_name_from_path(str(path))
    where = "cuda" if device.type == "cuda" and device.index in (None, 0) else str(device)
    tokenizer, model, processor, _ = llava["model.builder"].load_pretrained_model(str(path), None, name, device=where)
    if not hasattr(model, "prepare_inputs_labels_for_multimodal") or "video" not in processor:
        raise ValueError(f"--checkpoint {path}: {type(model).__name__} is not a LLaVA-3D model (no scene input "
                         "preparation or no video processor)")
    answerer = LLaVA3DAnswerer(llava, tokenizer, model.eval(), processor, device, video_folder=video_folder,
                               conv_mode=conv_mode, greedy=greedy)
    return answerer, path


register_answerer("llava3d", load_answerer)
