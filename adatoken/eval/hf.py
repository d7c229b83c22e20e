"""`adatoken eval --model hf --checkpoint PATH`: a local Hugging Face image-text-to-text checkpoint (LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, ...) answering image questions through its own processor.

The folder holds the model and its processor (`save_pretrained` of both); nothing is ever downloaded. Each
question's image (the JSONL `image` field) and text go through the processor's chat template as one user turn
with the image first, batches are left-padded, decoding is greedy, and an answer is the generated text up to
the end of the turn (the tokenizer's special tokens removed), stripped. The spatial tokens are the image
tokens the processor expanded, found by the model's `image_token_id`: nothing else to mark.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from adatoken.eval.datasets import QARecord
from adatoken.eval.runner import register_answerer


class HFAnswerer:
    def __init__(self, model, processor, device: torch.device):
        self.llm, self.processor, self.device = model, processor, device
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row at the last column

    def answer(self, records: Sequence[QARecord], max_new_tokens: int) -> list[str]:
        inputs = chat_inputs(self.processor, records).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.llm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def chat_inputs(processor, records: Sequence[QARecord], answers: Sequence[str] | None = None):
    """The processor's inputs for `records` (left-padded): each question as one user turn, its image first, through
    the chat template up to the assistant's turn; with `answers`, each record's answer text follows its prompt
    (calibration: the answer's attention, as the paper measures it)."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.question}]}],
        add_generation_prompt=True) for r in records]
    if answers is not None:
        prompts = [f"{prompt}{answer}" for prompt, answer in zip(prompts, answers, strict=True)]
    return processor(images=[_image(r) for r in records], text=prompts, padding=True, return_tensors="pt")


def _image(record: QARecord):
    from PIL import Image, UnidentifiedImageError

    path = record.extra.get("image")
    if path is None:
        raise ValueError(f"question {record.question_id!r} has no image: --model hf answers image questions "
                         "(a JSONL record with an image path, docs/metrics.md)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"question {record.question_id!r}: cannot read image {path}: {exc}") from None


def load_model_and_processor(checkpoint: str | Path | None, device: torch.device, option: str = "--checkpoint"):
    """A local checkpoint folder's model (on `device`, eval mode) and processor; clear errors for a folder that
    lacks either."""
    from transformers import AutoProcessor

    from adatoken.core.models import load_checkpoint

    if checkpoint is None:
        raise ValueError(f"--model hf needs {option} PATH: a local folder with the model and its processor")
    path = Path(checkpoint).resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"{option} {path}: no config.json there; expected a folder written by the model's "
                         "save_pretrained (and its processor's)")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{option} {path}: no processor could be loaded from it ({exc}); save the model's "
                         "processor there too (processor.save_pretrained)") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "apply_chat_template"):
        raise ValueError(f"{option} {path}: {type(processor).__name__} is not a multimodal processor with a "
                         "tokenizer and a chat template")
    return load_checkpoint(path).to(device).eval(), processor, path


def load_answerer(checkpoint: str | None, device: torch.device) -> tuple[HFAnswerer, Path]:
    """The checkpoint folder's model and processor on `device`."""
    model, processor, path = load_model_and_processor(checkpoint, device)
    return HFAnswerer(model, processor, device), path


register_answerer("hf", load_answerer)
