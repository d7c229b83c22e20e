"""llava/model/builder.py's load_pretrained_model: (tokenizer, model, processor, context_len), the processor a dict
with a 'video' entry, the model in bfloat16 by default, device_map {"": device} off CUDA."""
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llava3d_models import LlavaLlama3D


class VideoProcessor:
    def preprocess(self, video, return_tensors="pt", mode="random", device=None, text=None):
        images, depths, poses, intrinsics = torch.load(Path(video) / "scene.pt")
        return {"images": images, "depth_images": depths, "poses": poses, "intrinsic": intrinsics}


def load_pretrained_model(model_path, model_base, model_name, torch_dtype=torch.bfloat16, load_8bit=False,
                          load_4bit=False, device_map="auto", device="cuda", use_flash_attn=False, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True)
    if device == "cuda" and not torch.cuda.is_available():  # device_map="auto" places it on the CPU then
        device = "cpu"
    model = LlavaLlama3D.from_pretrained(model_path, torch_dtype=torch_dtype).to(device)
    return tokenizer, model, {"video": VideoProcessor()}, 2048
