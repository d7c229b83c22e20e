"""TokenLayout: per sample, which positions are padding, system, spatial, prompt and answer tokens.

A 3D LMM's input is `system | spatial | prompt` (then answer tokens). The runtime needs only the
spatial mask and which tokens are real (not padding); the flow analysis also needs the groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPS = ("system", "spatial", "prompt", "answer")


@dataclass
class TokenLayout:
    spatial: torch.Tensor   # [B, S] bool
    real: torch.Tensor      # [B, S] bool: not padding
    prompt_end: torch.Tensor  # [B] position of the last instruction token (the ranking query)

    @classmethod
    def build(cls, spatial: torch.Tensor, attention_mask: torch.Tensor | None = None,
              prompt_end: torch.Tensor | None = None) -> "TokenLayout":
        batch, length = spatial.shape
        real = torch.ones_like(spatial) if attention_mask is None else attention_mask.to(torch.bool)
        if prompt_end is None:  # generation: the prefill ends with the last instruction token
            prompt_end = torch.full((batch,), length - 1, dtype=torch.long, device=spatial.device)
        return cls(spatial & real, real, prompt_end)

    @property
    def num_spatial(self) -> list[int]:
        return self.spatial.sum(1).tolist()

    def group_ids(self) -> torch.Tensor:
        """[B, S] long: index into GROUPS per position, -1 for padding.

        system = real tokens before the first spatial token; spatial; prompt = after the first spatial
        token up to the last instruction token (non-spatial); answer = after the last instruction token.
        """
        batch, length = self.spatial.shape
        pos = torch.arange(length, device=self.spatial.device).expand(batch, length)
        first_spatial = torch.where(self.spatial.any(1), self.spatial.float().argmax(1), self.prompt_end + 1)
        ids = torch.full((batch, length), 2, dtype=torch.long, device=self.spatial.device)
        ids[pos < first_spatial[:, None]] = 0
        ids[pos > self.prompt_end[:, None]] = 3
        ids[self.spatial] = 1
        ids[~self.real] = -1
        return ids


def spatial_mask_from_ids(input_ids: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """True where the input holds one of the spatial token ids (image and video placeholders)."""
    spatial = input_ids == token_ids[0]
    for token_id in token_ids[1:]:  # compared one by one, so no id table is copied to the device
        spatial |= input_ids == token_id
    return spatial


def check_spatial_mask(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Validate an explicit spatial mask against the input's [batch, seq] shape; return it as bool."""
    if not torch.is_tensor(mask):
        raise ValueError(f"the spatial mask must be a torch.Tensor of shape [batch, seq], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"the spatial mask must be bool (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask.to(torch.bool)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"the spatial mask has shape {tuple(mask.shape)} but the input is [batch, seq] = {tuple(shape)}; "
            "pass one bool per input position (True at the spatial tokens)"
        )
    return mask


# ----- input checks shared by the pruning runtime and the flow analysis ---------------------------
def find_spatial(shape: tuple[int, int], device, explicit: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None, token_ids: tuple[int, ...] = ()) -> torch.Tensor | None:
    """The spatial mask of an input of `shape` [batch, seq]: the explicit mask (checked), else where
    `input_ids` hold one of the spatial token ids; None when there is neither to go by."""
    if explicit is not None:
        return check_spatial_mask(explicit, shape).to(device)
    if token_ids and input_ids is not None and tuple(input_ids.shape) == tuple(shape):
        return spatial_mask_from_ids(input_ids, token_ids).to(device)
    return None


def check_query_index(query, batch: int, length: int, device) -> torch.Tensor:
    """The last instruction token's position per sample, [batch] long, from an int, a list or a tensor."""
    query = torch.as_tensor(query, dtype=torch.long, device=device).reshape(-1).expand(batch)
    if bool(((query < 0) | (query >= length)).any()):
        raise ValueError(f"query_index must be a position in [0, {length - 1}], got {query.tolist()}")
    return query


def check_window(length: int, window: int | None, what: str) -> None:
    """Refuse inputs longer than a sliding attention window (Mistral v0.1): `what` says what cannot cope."""
    if window is not None and length > window:
        raise ValueError(f"input of {length} tokens exceeds the sliding window ({window}); {what}")
