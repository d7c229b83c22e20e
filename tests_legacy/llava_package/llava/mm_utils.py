"""llava/mm_utils.py: tokenizer_image_token, process_videos, get_model_name_from_path (same signatures)."""
import torch

from llava.constants import IMAGE_TOKEN_INDEX


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids = ids + [image_token_index] + chunk
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
