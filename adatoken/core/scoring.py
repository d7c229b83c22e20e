"""Pure tensor code that ranks spatial tokens. No transformers imports; callers pass weights and tables.

Three rankings:
- `query_key_scores`: V_j = Q_t · K_jᵀ summed over heads, the paper's (and PyramidDrop's) ranking of
  token j by the last instruction token t, with RoPE at the original positions, in fp32.
- `last_token_attention`: FastV's ranking as its released code computes it, the softmax attention of
  the last instruction token over token j, averaged over heads.
- `random_scores`: a seeded per-sample permutation, the control.
"""
from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as Llama/Qwen2/Mistral apply it; x [..., L, head_dim], cos/sin broadcastable."""
    return x * cos + _rotate_half(x) * sin


def project_heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, head_dim: int, norm=None) -> torch.Tensor:
    """x [..., D] → per-head projections [..., heads, head_dim] in fp32, through a per-head norm if given."""
    out = x.float() @ w.float().T
    if b is not None:
        out = out + b.float()
    out = out.view(*x.shape[:-1], -1, head_dim)
    return norm(out).float() if norm is not None else out


def query_key_scores(query_hidden: torch.Tensor, key_hidden: torch.Tensor,
                     w_q: torch.Tensor, b_q: torch.Tensor | None, w_k: torch.Tensor, b_k: torch.Tensor | None,
                     cos_q: torch.Tensor, sin_q: torch.Tensor, cos_k: torch.Tensor, sin_k: torch.Tensor,
                     num_heads: int, num_kv_heads: int, q_norm=None, k_norm=None,
                     key_rms_norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Σ_heads q_t · k_j for every key token j, without materialising the keys where it can.

    query_hidden [B, D] and key_hidden [B, N, D] are the layer's *normed* inputs; cos/sin are the
    rotary tables at the query's [B, hd] and keys' [B, N, hd] original positions (per token, so
    Qwen2-VL's multimodal RoPE, whose sections the decoder has already assembled, needs nothing
    more). q_norm/k_norm are per-head norms applied before RoPE (Qwen3), or None. Returns [B, N] fp32.
    With `key_rms_norm` = (weight, eps), key_hidden is the *raw* input and the RMSNorm is folded in too:
    its weight into the folded matrix, its 1/rms(x_j) as a per-token scale (one reduction over x_j).

    Why it is cheap: with rotate-half RoPE, pair i of a head (dims i and i+h, h = hd/2) contributes
    cos_ji·(u_i k_i + u_{i+h} k_{i+h}) + sin_ji·(u_{i+h} k_i − u_i k_{i+h}), where u is the rotated
    query summed over the heads sharing that key head (GQA). Both brackets are linear in the key's
    input x_j, and the rotation frequencies are shared by all heads, so summing over heads first folds
    W_k into one [hd, D] matrix. Scoring N tokens then costs N·D·hd multiply-adds instead of the
    N·D·(kv_heads·hd) of a key projection: a factor of kv_heads cheaper (32× on LLaVA-3D-7B).
    A norm on k is not linear in x_j, so with one the keys are projected, normed and rotated instead.
    """
    batch, hidden = query_hidden.shape
    head_dim = w_q.shape[0] // num_heads
    half = head_dim // 2
    f32 = torch.float32

    q = project_heads(query_hidden, w_q, b_q, head_dim, q_norm)
    q = apply_rope(q, cos_q.to(f32)[:, None], sin_q.to(f32)[:, None])
    u = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).sum(dim=2)  # [B, kv, hd]
    if k_norm is not None:
        k = project_heads(key_hidden, w_k, b_k, head_dim, k_norm)                      # [B, N, kv, hd]
        k = apply_rope(k, cos_k.to(f32)[:, :, None], sin_k.to(f32)[:, :, None])
        return torch.einsum("bnkd,bkd->bn", k, u)

    # One batched matmul over the h rotary pairs: pair i's row of the cos term is
    # [u_lo[:, i], u_hi[:, i]] · [W_lo[:, i]; W_hi[:, i]], of the sin term [u_hi[:, i], −u_lo[:, i]] · same.
    u_lo, u_hi = u[..., :half].permute(2, 0, 1), u[..., half:].permute(2, 0, 1)      # [h, B, kv]
    rows = torch.cat((torch.cat((u_lo, u_hi), -1), torch.cat((u_hi, -u_lo), -1)), 1)  # [h, 2B, 2kv]
    w_pairs = w_k.view(num_kv_heads, 2, half, hidden).permute(2, 1, 0, 3).reshape(half, 2 * num_kv_heads, hidden)
    folded = torch.bmm(rows, w_pairs.to(f32))                                         # [h, 2B, D]
    folded = torch.cat((folded[:, :batch], folded[:, batch:]), 0).transpose(0, 1)     # [B, hd, D]
    if key_rms_norm is not None:
        weight, eps = key_rms_norm
        folded = folded * weight.to(f32)
    proj = torch.bmm(key_hidden.to(f32), folded.transpose(1, 2))                      # [B, N, hd]
    if key_rms_norm is not None:
        mean_square = torch.linalg.vector_norm(key_hidden, dim=-1, dtype=f32).square() / hidden
        proj = proj * torch.rsqrt(mean_square + eps)[..., None]
    if b_k is not None:  # the bias is a constant input: the same fold, applied to it
        bias_pairs = b_k.to(f32).view(num_kv_heads, 2, half).permute(2, 1, 0).reshape(half, 2 * num_kv_heads, 1)
        bias = torch.bmm(rows, bias_pairs)[..., 0]                                    # [h, 2B]
        proj = proj + torch.cat((bias[:, :batch], bias[:, batch:]), 0).T[:, None, :]
    cos_k, sin_k = cos_k.to(f32)[..., :half], sin_k.to(f32)[..., :half]
    return (proj[..., :half] * cos_k).sum(-1) + (proj[..., half:] * sin_k).sum(-1)


def last_token_attention(query: torch.Tensor, keys: torch.Tensor, key_ok: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of one query token over all keys, averaged over heads (FastV's ranking).

    query [B, H, hd] and keys [B, Hkv, L, hd] are rotated; key_ok [B, L] marks the keys the query may
    attend (real tokens at or before it). Returns [B, L] fp32.
    """
    groups = query.shape[1] // keys.shape[1]
    logits = torch.einsum("bhd,bhld->bhl", query.float(), keys.float().repeat_interleave(groups, dim=1)) * scaling
    weights = torch.softmax(logits.masked_fill(~key_ok[:, None, :], float("-inf")), dim=-1)
    return weights.mean(dim=1)


def random_scores(num_candidates: list[int], seed: int) -> list[torch.Tensor]:
    """One fixed random score per candidate, per sample, from `seed` alone.

    Drawn per sample (not per batch) so a sample scores the same alone or in a batch, and the same at
    every layer, so progressive pruning keeps a nested random subset.
    """
    generator = torch.Generator().manual_seed(seed)
    state = generator.get_state()
    scores = []
    for n in num_candidates:
        generator.set_state(state)
        scores.append(torch.rand(n, generator=generator))
    return scores
