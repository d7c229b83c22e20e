"""llava/mm_utils.py: tokenizer_image_token, tokenizer_special_token, process_videos, get_model_name_from_path
(same signatures)."""
import re

import torch

from llava.constants import IMAGE_TOKEN_INDEX, LOC_TOKEN_INDEX


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids = ids + [image_token_index] + chunk
    return torch.tensor(ids, dtype=torch.long) if return_tensors == "pt" else ids


def tokenizer_special_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, box_token_index=LOC_TOKEN_INDEX,
                            return_tensors=None):
    """LLaVA-3D's mm_utils.py:234-258: <image> and <boxes> become one placeholder id each, the text between them
    is tokenised chunk by chunk, a leading BOS kept once."""
    chunks = re.split(r"(<image>|<boxes>)", prompt)
    first = tokenizer(chunks[0]).input_ids
    offset = 1 if first and first[0] == tokenizer.bos_token_id else 0
    ids = first[:offset]
    for chunk in chunks:
        if chunk == "<image>":
            ids.append(image_token_index)
        elif chunk == "<boxes>":
            ids.append(box_token_index)
        else:
            ids.extend(tokenizer(chunk).input_ids[offset:])
    return torch.tensor(ids, dtype=torch.long) if return_tensors == "pt" else ids


def process_videos(videos, video_processor, mode="random", device=None, text=None):
    videos = [videos] if isinstance(videos, str) else videos
    processed = [video_processor.preprocess(video, return_tensors="pt", mode=mode, device=device, text=text)
                 for video in videos]
    return {"images": torch.stack([p["images"] for p in processed]),
            "depths": torch.stack([p["depth_images"] for p in processed]),
            "poses": torch.stack([p["poses"] for p in processed]),
            "intrinsics": torch.stack([p["intrinsic"] for p in processed])}


def get_model_name_from_path(model_path):
    parts = model_path.strip("/").split("/")
    return parts[-2] + "_" + parts[-1] if parts[-1].startswith("checkpoint-") else parts[-1]
