"""`adatoken eval --model hf --checkpoint PATH`: a local Hugging Face image-text-to-text checkpoint (LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) answering image questions through its own processor.

The folder holds the model and its processor (`save_pretrained` of both); nothing is ever downloaded. Each
question's image (the JSONL `image` field) and text (with `--prompt-suffix` on a new line after it) go through the
processor's chat template as one user turn with the image first, batches are left-padded, and decoding is greedy
(one beam; the checkpoint's generation config stands for the rest). An answer is the generated text up to the end
of the assistant's turn: generation stops at the end-of-text tokens and at the token the chat template closes a turn
with (Qwen's `<|im_end|>`), the text is decoded without special tokens, cut where that end-of-turn string begins if
it survived decoding (a template whose turns end in plain text), and stripped. The spatial tokens are the image
tokens the processor expanded, found by the model's `image_token_id`: nothing else to mark. Without torchvision, the
processor of a family that also reads videos is built without its video processor (`_processor_without_videos`).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from adatoken.eval.datasets import QARecord
from adatoken.eval.runner import register_answerer

# The image question sets --model hf answers -> the files each reads besides --data, and whether each is required
# (TextVQA's images default to train_images/ beside its file, LLaVA's layout). eval and analyze/sweep share it.
IMAGE_SETS = {"jsonl": {}, "vqav2": {"answers": True, "images": True}, "textvqa": {"images": False}}


class HFAnswerer:
    def __init__(self, model, processor, device: torch.device, prompt_suffix: str | None = None):
        self.llm, self.processor, self.device = model, processor, device
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row at the last column
        self.prompt_suffix = prompt_suffix
        self.end_of_turn = end_of_turn(processor)
        self.stop_ids = self._stop_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        # recorded in the run's settings, so a resumed run cannot mix prompts, and printed in the report
        self.decoding = "greedy" + (f", prompt suffix {prompt_suffix!r}" if prompt_suffix else "")

    def _stop_ids(self) -> list[int]:
        """Token ids that end an answer: the checkpoint's end-of-text ids, the tokenizer's, and the end-of-turn token
        (a checkpoint whose generation config names only <|endoftext|> would otherwise talk past <|im_end|>)."""
        configured = self.llm.generation_config.eos_token_id  # None, an id or a list of ids
        ids = {configured} if isinstance(configured, int) else set(configured or ())
        ids.add(self.tokenizer.eos_token_id)
        if self.end_of_turn is not None:
            token = self.tokenizer.convert_tokens_to_ids(self.end_of_turn)
            if token is not None and token != self.tokenizer.unk_token_id:  # a single token
                ids.add(token)
        ids.discard(None)
        if not ids:
            raise ValueError("the checkpoint names no end-of-text token (generation_config.eos_token_id, the "
                             "tokenizer's eos_token): answers would not know where to end")
        return sorted(ids)

    def answer(self, records: Sequence[QARecord], max_new_tokens: int) -> list[str]:
        if self.prompt_suffix:
            records = [dataclasses.replace(r, question=f"{r.question}\n{self.prompt_suffix}") for r in records]
        inputs = chat_inputs(self.processor, records).to(self.device)
        with torch.inference_mode():
            out = self.llm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        return self.texts(out[:, inputs["input_ids"].shape[1]:])

    def texts(self, new_tokens: torch.Tensor) -> list[str]:
        """Each row's answer from its generated tokens [batch, new]: up to the first stop token, decoded without
        special tokens, cut at the end-of-turn string if it is still there, stripped."""
        answers = []
        for row in new_tokens.tolist():
            ends = [i for i, token in enumerate(row) if token in self.stop_ids]
            text = self.tokenizer.decode(row[:ends[0]] if ends else row, skip_special_tokens=True)
            if self.end_of_turn:
                text = text.split(self.end_of_turn, 1)[0]
            answers.append(text.strip())
        return answers


def chat_inputs(processor, records: Sequence[QARecord]):
    """The processor's inputs for `records` (left-padded): each question as one user turn, its image first, through
    the chat template up to the assistant's turn (calibration appends the answer's ids to one question's inputs)."""
    prompts = [processor.apply_chat_template(_turns(r.question), add_generation_prompt=True) for r in records]
    return processor(images=[_image(r) for r in records], text=prompts, padding=True, return_tensors="pt")


def _turns(question: str, answer: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def end_of_turn(processor) -> str | None:
    """What the chat template writes after an assistant's answer, stripped (Qwen's '<|im_end|>', Mistral's '</s>');
    None where it writes nothing there (LLaVA-1.5: the end-of-text token alone ends an answer)."""
    from jinja2 import TemplateError

    probe = "ANSWERPROBE"
    try:
        text = processor.apply_chat_template(_turns("?", probe), add_generation_prompt=False)
    except TemplateError:  # a template that refuses an assistant turn: the end-of-text tokens still end answers
        return None
    if probe not in text:  # a template that rewrites answers: the end-of-text tokens still end them
        return None
    return text[text.index(probe) + len(probe):].strip() or None


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


def supported_families() -> list[str]:
    """Model types --model hf runs: the families whose image tokens adatoken finds from the input ids."""
    from adatoken.core.adapters import FAMILIES

    return sorted(name for name, family in FAMILIES.items() if family.spatial_token_attrs)


def load_model_and_processor(checkpoint: str | Path | None, device: torch.device, option: str = "--checkpoint"):
    """A local checkpoint folder's model (on `device`, eval mode) and processor; clear errors for a folder that
    lacks either or holds a model --model hf cannot run."""
    from adatoken.core.models import load_checkpoint

    if checkpoint is None:
        raise ValueError(f"--model hf needs {option} PATH: a local folder with the model and its processor")
    path = Path(checkpoint).resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"{option} {path}: no config.json there; expected a folder written by the model's "
                         "save_pretrained (and its processor's)")
    _check_architecture(path, option)
    processor = _load_processor(path, option)
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "apply_chat_template"):
        raise ValueError(f"{option} {path}: {type(processor).__name__} is not a multimodal processor with a "
                         "tokenizer and a chat template")
    return load_checkpoint(path).to(device).eval(), processor, path


def _check_architecture(path: Path, option: str) -> None:
    """Refuse, before any weights load, a config that is not one of the image-text-to-text families we run."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} {path}: config.json is not valid JSON ({exc})") from None
    model_type, architectures = config.get("model_type"), ", ".join(config.get("architectures") or ["none named"])
    supported = supported_families()
    if model_type in supported:
        return
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        why = "an image-text-to-text model adatoken does not prune (docs/families.md says why)"
    else:
        why = "not an image-text-to-text model this transformers can load (a text-only model has no image tokens)"
    raise ValueError(f"{option} {path}: config.json describes model type {model_type!r} ({architectures}), {why}; "
                     f"--model hf runs these model types: {', '.join(supported)}")


def _load_processor(path: Path, option: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise ValueError(f"{option} {path}: its processor needs a package that is not installed: {exc}") from None
        # transformers 5 builds every video processor with torchvision, and a family that reads videos too
        # (Qwen2-VL, LLaVA-OneVision) cannot build its processor without one; image questions never use it
        return _processor_without_videos(path, option)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{option} {path}: no processor could be loaded from it ({exc}); save the model's "
                         "processor there too (processor.save_pretrained)") from None


def _processor_without_videos(path: Path, option: str):
    """The folder's processor class built from its image processor, tokenizer, chat template and options, with no
    video processor: what AutoProcessor would return, less the videos that --model hf never passes."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    names = [json.loads((path / name).read_text()).get("processor_class") for name in
             ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json") if (path / name).is_file()]
    processor_class = next((getattr(transformers, name) for name in names if hasattr(transformers, name or "")), None)
    if processor_class is None or set(processor_class.get_attributes()) - {"image_processor", "tokenizer",
                                                                           "video_processor"}:
        raise ValueError(f"{option} {path}: its processor needs torchvision, which is not installed "
                         "(pip install torchvision)")

    class WithoutVideos(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None  # the one sub-processor allowed to be absent
            return super().check_argument_for_proper_class(argument_name, argument)

    parts = {"image_processor": AutoImageProcessor.from_pretrained(path, local_files_only=True),
             "tokenizer": AutoTokenizer.from_pretrained(path, local_files_only=True), "video_processor": None}
    settings, options = processor_class.get_processor_dict(path, local_files_only=True)
    return WithoutVideos.from_args_and_dict([parts[name] for name in processor_class.get_attributes()], settings,
                                            **options)


def load_answerer(checkpoint: str | None, device: torch.device,
                  prompt_suffix: str | None = None) -> tuple[HFAnswerer, Path]:
    """The checkpoint folder's model and processor on `device`; `prompt_suffix` follows every question."""
    if prompt_suffix is not None and not prompt_suffix.strip():
        raise ValueError("--prompt-suffix is empty: give the text to append, or leave the option out")
    model, processor, path = load_model_and_processor(checkpoint, device)
    return HFAnswerer(model, processor, device, prompt_suffix), path


register_answerer("hf", load_answerer)
