"""Literal re-implementations of FastV, PyramidDrop, DART and DivPrune as released, for the fidelity tests (issue 17).

Written here from the released code (read, not copied), on a transformers-5 `LlamaForCausalLM` (eager or sdpa,
batch 1, no padding): each function runs the decoder layer by layer itself. Cited as
  [FV]  pkunlp-icler/FastV@d1659729 src/transformers/src/transformers/models/llama/modeling_llama.py
  [FVh] pkunlp-icler/FastV@d1659729 src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py
  [PD]  Cooperx521/PyramidDrop@6444f304 llava/model/modeling_llama_pdrop.py
  [DA]  ZichenWen1/DART@5a19452f llava/model/language_model/modeling_llama_self.py (read in the fork
        xqy1111111/DART, whose later commits touch only scripts/classification and experiments)
  [DP]  vbdi/divprune@799e2d95 LLaVA/llava/model/llava_arch.py

Details of the released code that are ambiguous or easy to get wrong:
FastV (in-place branch, [FV]:729-760)
- The count is an absolute `fast_v_attention_rank` ([FV]:720,746); the eval script passes (1-R)*N
  (src/FastV/inference/eval/eval_aokvqa_latency_fastv_inplace.sh:7: 72/144/288/432 of 576). The HF-LLaVA
  kv-cache variant computes it as round(N*(1-r)) with r the DROP ratio ([FVh]:1048,1082): Python's round,
  i.e. half to even (N=5, r=0.5 keeps 2), not int().
- The ranked tensor is `layer_outputs[1]` read at idx == K before layer K runs ([FV]:736-738), i.e. the weights
  returned by layer K-1 for its (unpruned) input. It holds weights only with output_attentions=True (the eval
  passes it, src/FastV/inference/eval/inference_aokvqa.py:284, with use_cache=False and max_new_tokens=1,
  :281-282); with a cache and no weights it would be the cache ([FV]:827; "KV-Cache not supported", [FV]:729).
  [FVh]:1105-1108 asks for weights only at layer K-1, which confirms the K-1 reading. K must be > 0 ([FV]:724-725).
- Weights are softmaxed in fp32 then cast to the model dtype (fp16 in the eval) before the head mean ([FV]:349,740);
  _attention_probs does the same, so the fp16 rounding (and its ties) appears only when run in fp16.
- Kept tokens keep their ORIGINAL position ids ([FV]:756); the new mask is plain causal over the new length with the
  padding mask dropped (None passed, [FV]:758-759), and `[0]` takes sample 0's weights ([FV]:740): batch 1 only.
  Layers after K reuse that mask (no branch resets it for idx > K). The RoPE table is sliced to 1000 positions
  ([FV]:319 with :124), so the released in-place code fails for original positions >= 1000.
PyramidDrop (pdrop_forward [PD]:1106-1288, pdrop_rank_drop [PD]:1291-1465)
- Counts are int(N*ratio) (floor) of the ORIGINAL N for both the current and the kept count ([PD]:1306-1307,
  decode :1262-1263), with 1.0 inserted in front of the user's ratios (llava/eval/model_vqa_loader.py:96).
- The drop runs after layer `layer_idx` when layer_idx+1 is in layer_list ([PD]:1222-1225), scored with the NEXT
  layer's weights, self.layers[layer_idx+1] ([PD]:1322-1323), i.e. the first layer of the new stage, on the
  current (already renumbered) positions ([PD]:1340-1342). A layer_list entry equal to num_layers would IndexError.
- Score: QK^T/sqrt(d) + causal mask over ALL keys, softmax in fp32 cast back to dtype ([PD]:1395-1397), mean over
  heads ([PD]:1399), image columns ([PD]:1400), mean over query tokens ([PD]:1401), topk and sort ([PD]:1405-1407).
  The query at inference is row prompt_len + current_image_count - 1 ([PD]:1390-1391; prompt_len = text tokens,
  llava/model/llava_arch.py:429), the last position when there is no padding. No repeat_kv is applied to the keys
  ([PD]:1395): with grouped-query attention (1 < kv heads < heads) that matmul cannot broadcast; here keys are repeated.
- After each drop positions are renumbered 0..n-1 ([PD]:1431,1445-1446; position_ids is never None there, since
  pdrop_forward builds it at :1151-1156). In decoding each new token's position is reduced, after layer
  rank_layer-1, by int(N*r_s) - int(N*r_{s+1}) ([PD]:1259-1268), starting from the layer-0 cache length (:1149).
- The mask is rebuilt with the ORIGINAL seq_length ([PD]:1247-1257) and rank_drop indexes tokens with a 2D mask
  ([PD]:1316,1351), so an eager 4D mask fails there; the flash-attention path keeps it None without padding
  ([PD]:1163, set by llava/model/builder.py:46-47), i.e. causal over the new length, as used here.
- Sequences are cut to tokenizer_model_max_length (default 2048) after a drop ([PD]:1419-1423); only the first
  image's position is used (llava_arch.py:421).
DART ([DA]:337-369 and get_retained_image_token :396-447)
- Before layer K runs (`layer_idx == K`, :337), from what layer K-1 returned: its output through the model's FINAL
  norm (:340-341) and its key states (`layer_outputs[-2]`, :342; appended by the decoder layer at :993), which the
  sdpa attention returns after RoPE and after repeat_kv (:875, 881); heads are concatenated per token (:419).
- per-pivot count TOKEN_TOPK = ceil(max_num_trunction // (pivots)) (:409), a floor since // comes first; pivots
  are the top-L1-norm keys among the image span and among everything after it (:421-428).
- The pivot loop runs over `list(indices_set)`, a Python set's iteration order (:433), and every pool is a set
  turned into a list (:431, 443); each pivot takes the topk of NEGATIVE cosine similarity (:436-437). Text pivots
  are removed at the end, their picks stay (:445); the result is concatenated with the text and sorted (:351-353).
- Kept tokens keep their original positions (:359); the mask is cut to the new length (:357-358). Batch 1 (:313).
DivPrune ([DP]:147-171, 352-386)
- On the projected image features as the LLM receives them (:374), before the LLM: K = int(round(ratio * N))
  (:153); distances 1 - cos (:147-150, 158); pick 0 = argmax of each column's second-smallest distance (:165),
  pick i = argmax of the column minimum over the picked rows (:162, 167); sorted back (:379) and gathered
  (:381); the shortened sequence runs from position 0 (position_ids None in generate, :349-350).
"""
from __future__ import annotations

import math

import torch


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask [1, 1, L, L]: 0 on and below the diagonal, the dtype's minimum above ([FV]:44-58)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama RoPE: x*cos + rotate_half(x)*sin, with rotate_half(x) = [-x2, x1] ([FV]:181-189)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _attention_probs(layer, h: torch.Tensor, cos, sin, mask) -> torch.Tensor:
    """The softmax attention [heads, L, L] that `layer` computes from its input h [1, L, D] the eager way:
    input_layernorm -> q/k projections -> RoPE -> (keys repeated for GQA) QK^T/sqrt(d) + mask -> fp32 softmax."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    d = attn.head_dim
    q = attn.q_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)  # [1, H, L, d]
    k = attn.k_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)  # [1, Hkv, L, d]
    q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(h.dtype)[0]


def _run_layer(layer, h, mask, pos, cos, sin) -> torch.Tensor:
    out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def fastv_reference(model, inputs_embeds, image_start: int, image_len: int, K: int, keep: int):
    """FastV's in-place pruning ([FV]:729-760): returns (kept original image positions, sorted; logits [vocab]
    at the last position). `keep` is the absolute `fast_v_attention_rank`; the image span is
    [image_start, image_start + image_len) (the script's fast_v_sys_length / fast_v_image_token_length)."""
    assert K > 0, "FastV asserts K > 0 ([FV]:724-725)"
    lm = model.model
    h = inputs_embeds
    length = h.shape[1]
    pos = torch.arange(length)[None]
    kept = list(range(image_start, image_start + image_len))
    mask = _causal_mask(length, h.dtype)
    last_weights = None  # plays the role of layer_outputs[1]: the weights of the previous layer
    for idx, layer in enumerate(lm.layers):
        if idx == K:  # [FV]:736-760
            avg = last_weights.mean(dim=0)  # head mean ([FV]:740)
            image_scores = avg[-1, image_start:image_start + image_len]  # last token's row, image columns (:742-744)
            top = image_scores.topk(keep).indices + image_start  # (:746)
            keep_idx = torch.cat((torch.arange(image_start), top, torch.arange(image_start + image_len, length)))
            keep_idx = keep_idx.sort().values  # (:748-750)
            h = h[:, keep_idx]  # (:754)
            pos = keep_idx[None]  # original positions kept (:756)
            mask = _causal_mask(len(keep_idx), h.dtype)  # causal over the new length (:758-759)
            kept = sorted(top.tolist())
        cos, sin = lm.rotary_emb(h, pos)
        if idx == K - 1:  # only layer K-1's weights are ever read
            last_weights = _attention_probs(layer, h, cos, sin, mask)
        h = _run_layer(layer, h, mask, pos, cos, sin)
    logits = model.lm_head(lm.norm(h))[0, -1]
    return kept, logits


@torch.no_grad()
def pdrop_reference(model, inputs_embeds, image_start: int, image_len: int, layer_list, ratio_list):
    """PyramidDrop prefill ([PD]:1187-1268 and 1291-1465). `layer_list` is 1-based ("after this many layers"),
    `ratio_list` starts with 1.0 (as the eval inserts). Returns (per stage: sorted kept ORIGINAL image positions;
    logits [vocab] at the last position)."""
    lm = model.model
    n_image = image_len  # N, the original image count ([PD] self.image_tokens, llava_arch.py:474)
    h = inputs_embeds
    prompt_len = h.shape[1] - n_image  # text tokens (llava_arch.py:429)
    original = torch.arange(h.shape[1])  # original position of every current token (bookkeeping only)
    pos = torch.arange(h.shape[1])[None]
    stages = []
    for layer_idx, layer in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(h, pos)
        mask = _causal_mask(h.shape[1], h.dtype)
        h = _run_layer(layer, h, mask, pos, cos, sin)
        rank_layer = layer_idx + 1  # [PD]:1222
        if rank_layer not in layer_list:
            continue
        stage = layer_list.index(rank_layer)  # [PD]:1225
        current = int(n_image * ratio_list[stage])  # [PD]:1306
        keep = int(n_image * ratio_list[stage + 1])  # [PD]:1307
        # score with the NEXT layer's norm, q/k and RoPE at the current positions ([PD]:1321-1342)
        probs = _attention_probs(lm.layers[rank_layer], h, cos, sin, mask)  # same h, positions, length as above
        query = prompt_len + current - 1  # [PD]:1390-1391
        head_mean = probs[:, query].mean(dim=0)  # [PD]:1399 (one query row, so :1401 is the identity)
        image_scores = head_mean[image_start:image_start + current]  # [PD]:1400
        top = image_scores.topk(keep).indices.sort().values + image_start  # [PD]:1405-1407
        sel = torch.cat((torch.arange(image_start), top, torch.arange(image_start + current, h.shape[1])))
        h, original = h[:, sel], original[sel]  # [PD]:1409-1410
        pos = torch.arange(h.shape[1])[None]  # renumbered 0..n-1 ([PD]:1445-1446)
        stages.append(original[image_start:image_start + keep].tolist())
    logits = model.lm_head(lm.norm(h))[0, -1]
    return stages, logits


def pdrop_decode_positions(total_len: int, N: int, layer_list, ratio_list, num_layers: int, step: int = 0):
    """Position id PyramidDrop gives the decoded token number `step` (0 = the first) at each layer ([PD]:1259-1268):
    it starts at the layer-0 cache length, total_len + step ([PD]:1149-1156), and after layer j with j+1 in
    layer_list drops by what that stage removed, int(N*r_s) - int(N*r_{s+1})."""
    position = total_len + step
    positions = []
    for layer_idx in range(num_layers):
        positions.append(position)
        if layer_idx + 1 in layer_list:
            stage = layer_list.index(layer_idx + 1)
            position -= int(N * ratio_list[stage]) - int(N * ratio_list[stage + 1])
    return positions


@torch.no_grad()
def dart_reference(model, inputs_embeds, image_start: int, image_len: int, K: int, max_num_trunction: int,
                   pivot_image_token: int = 4, pivot_text_token: int = 4):
    """DART's prefill ([DA]:337-369, 396-447): returns (kept ORIGINAL image positions, sorted; logits [vocab]
    at the last position)."""
    lm = model.model
    h = inputs_embeds
    length = h.shape[1]
    pos = torch.arange(length)[None]
    mask = _causal_mask(length, h.dtype)
    kept = list(range(image_start, image_start + image_len))
    key_states = None  # plays the role of layer_outputs[-2]: the previous layer's keys
    for idx, layer in enumerate(lm.layers):
        if idx == K:
            last_layer_state = lm.norm(h)  # :340-341
            k = key_states.permute(0, 2, 1, 3).reshape(1, length, -1)  # :419
            k_image = k[0][image_start:image_start + image_len]  # :421
            k_query = k[0][image_start + image_len:]  # :422
            top_k = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))  # :409
            image_indices = (torch.norm(k_image, p=1, dim=-1).topk(pivot_image_token).indices + image_start).tolist()
            query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text_token).indices
                             + image_start + image_len).tolist()
            indices_set = set(image_indices + query_indices)  # :429
            valid_indices = set(range(image_start, image_start + image_len)) - set(image_indices)  # :431
            valid_list = list(valid_indices)
            for item in list(indices_set):  # :433
                similarity = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :],
                                                                     last_layer_state[0][valid_list, :], dim=-1)
                real = [valid_list[i] for i in similarity.topk(top_k).indices]  # :437-439
                indices_set.update(real)
                valid_indices.difference_update(real)
                valid_list = list(valid_indices)
            indices_set.difference_update(query_indices)  # :445
            retained = torch.tensor(list(indices_set))
            keep = torch.cat((torch.arange(image_start), retained, torch.arange(image_start + image_len, length)))
            keep = keep.sort().values  # :351-353
            h = h[:, keep]
            pos = keep[None]  # original positions (:359)
            mask = _causal_mask(len(keep), h.dtype)  # :357-358
            kept = sorted(retained.tolist())
        cos, sin = lm.rotary_emb(h, pos)
        if idx == K - 1:  # the keys this layer's attention returns: projected, rotated, repeated (:864-881)
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
            k = _rotate(k, cos[:, None], sin[:, None])
            groups = model.config.num_attention_heads // model.config.num_key_value_heads
            key_states = k.repeat_interleave(groups, dim=1)
        h = _run_layer(layer, h, mask, pos, cos, sin)
    logits = model.lm_head(lm.norm(h))[0, -1]
    return kept, logits


@torch.no_grad()
def divprune_reference(model, inputs_embeds, image_start: int, image_len: int, ratio: float):
    """DivPrune before the LLM ([DP]:147-171, 352-386): returns (kept ORIGINAL image positions, sorted; logits
    [vocab] at the last position of the shortened sequence, run from position 0)."""
    features = inputs_embeds[0][image_start:image_start + image_len]  # :374
    threshold_terms = int(round(ratio * image_len))  # :153
    unit = features / features.norm(dim=1, keepdim=True)  # :147-150
    cosine_matrix = 1.0 - unit @ unit.t()
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):  # :159-170
        if i == 0:
            scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(cosine_matrix[s[:i]], dim=0).values
        s[i] = torch.argmax(scores)
    length = inputs_embeds.shape[1]
    keep = torch.cat((torch.arange(image_start), s + image_start, torch.arange(image_start + image_len, length)))
    keep = keep.sort().values  # :377-379
    logits = model(inputs_embeds=inputs_embeds[:, keep]).logits[0, -1]  # positions 0..n-1
    return sorted((s + image_start).tolist()), logits
