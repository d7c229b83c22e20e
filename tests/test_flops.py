"""The closed-form FLOPs agree with torch's FlopCounterMode on tiny random models, and with arithmetic by hand."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from adatoken.core.flops import (
    ModelShape,
    decode_flops,
    flops_ratio,
    generation_flops,
    kv_cache_bytes,
    layer_flops,
    prefill_flops,
)

SEQ = 24


def llama_config(attn_implementation: str = "eager") -> LlamaConfig:
    return LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn_implementation)


def qwen2_config() -> Qwen2Config:
    # Qwen2 has q/k/v biases (FlopCounterMode counts addmm as its matmul alone, as we do) and GQA 4:1.
    return Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, attn_implementation="eager")


def counted_flops(model, **inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def attention_flops(shape: ModelShape, n: int) -> int:
    return shape.num_layers * 2 * 2 * shape.num_heads * n * n * shape.head_dim


def ours_and_counted(attn: str) -> tuple[int, int, ModelShape]:
    """Our analytic prefill count of a SEQ-token forward with logits at every position, and torch's."""
    config = llama_config(attn)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, SEQ))
    shape = ModelShape.from_config(config)
    return prefill_flops(shape, [SEQ] * shape.num_layers, lm_head_positions=SEQ).total, \
        counted_flops(model, input_ids=ids), shape


def test_llama_eager_forward_matches_flop_counter():
    ours, counted, _ = ours_and_counted("eager")
    assert abs(ours - counted) / counted < 0.02
    # Both count only matmuls, with the attention rectangle in full, so they agree to the FLOP.
    assert ours == counted


def test_llama_sdpa_forward_flop_counter_on_cpu():
    # FlopCounterMode has formulas for the CUDA sdpa kernels (flash, efficient, cudnn) but, in torch 2.13,
    # none for the CPU fused kernel, so on CPU it misses the attention matmuls entirely. Our count does not
    # depend on the kernel; accept either behaviour so a torch that learns the CPU kernel keeps this passing.
    ours, counted, shape = ours_and_counted("sdpa")
    assert counted in (ours, ours - attention_flops(shape, SEQ))


def test_qwen2_gqa_biases_forward_and_decode_match_flop_counter():
    config = qwen2_config()
    model = Qwen2ForCausalLM(config).eval()
    shape = ModelShape.from_config(config)
    assert (shape.num_kv_heads, shape.head_dim) == (2, 8)
    ids = torch.randint(0, config.vocab_size, (1, SEQ))

    # generate's prefill projects only the last position through the LM head
    counted = counted_flops(model, input_ids=ids, logits_to_keep=1)
    assert counted == prefill_flops(shape, [SEQ] * shape.num_layers, lm_head_positions=1).total

    # one decoding step: the new token attends over SEQ cached entries plus itself
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    counted = counted_flops(model, input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert counted == decode_flops(shape, [SEQ + 1] * shape.num_layers).total


# A small pruned schedule worked by hand: 3 layers, hidden h=8, intermediate I=16, H=2 query heads,
# Hkv=1 key/value head, head_dim d=4, vocab V=10.
SMALL = ModelShape(num_layers=3, hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4, vocab=10)


def test_prefill_pruned_schedule_by_hand():
    # per layer at n tokens:
    #   q_proj 2·n·8·(2·4) = 128n   k_proj 2·n·8·(1·4) = 64n   v_proj 64n   o_proj 2·n·8·8 = 128n  -> 384n
    #   QKᵀ + AV   2 · 2·2·n·n·4 = 32n²
    #   MLP        3 · 2·n·8·16 = 768n
    #   layer total 1152n + 32n²
    # tokens entering the layers: 10 (all), then 6, then 4 after pruning
    #   n=10: 11520 + 3200 = 14720    n=6: 6912 + 1152 = 8064    n=4: 4608 + 512 = 5120
    # LM head for one position: 2·8·10 = 160
    flops = prefill_flops(SMALL, [10, 6, 4], lm_head_positions=1)
    assert flops.per_layer == [14720, 8064, 5120]
    assert flops.lm_head == 160
    assert flops.total == 14720 + 8064 + 5120 + 160 == 28064
    # a plain forward projects all 10 input positions: 2·10·8·10 = 1600
    assert prefill_flops(SMALL, [10, 6, 4], lm_head_positions=10).lm_head == 1600
    # unpruned: 3 · 14720 + 160 = 44320, so the pruned prefill costs 28064 / 44320 of it
    assert flops_ratio(SMALL, [10, 6, 4], [10, 10, 10]) == pytest.approx(28064 / 44320)


def test_decode_and_generation_by_hand():
    # decoding one token (q = 1) over k cache entries: 1152 + 32k per layer, plus 160 for the LM head.
    # Each layer's cache holds what it kept in prefill (10, 6, 4) plus the new token: k = 11, 7, 5
    #   1152 + 352 = 1504    1152 + 224 = 1376    1152 + 160 = 1312    total 1504 + 1376 + 1312 + 160 = 4352
    step1 = decode_flops(SMALL, [11, 7, 5])
    assert step1.per_layer == [1504, 1376, 1312]
    assert step1.total == 4352
    # the next step sees k = 12, 8, 6: 3·1152 + 32·(12 + 8 + 6) + 160 = 3456 + 832 + 160 = 4448
    assert decode_flops(SMALL, [12, 8, 6]).total == 4448
    # three new tokens: the prefill makes the first, two decoding steps the others
    assert generation_flops(SMALL, [10, 6, 4], new_tokens=3) == 28064 + 4352 + 4448
    assert layer_flops(SMALL, 1, 11) == 1504


def test_kv_cache_bytes_by_hand():
    # each cached entry holds a key and a value of Hkv·d = 1·4 elements per layer: 2·4 = 8 elements,
    # 16 bytes in fp16. Entries kept: 10 + 6 + 4 = 20, so 320 bytes; 640 in fp32.
    assert kv_cache_bytes(SMALL, [10, 6, 4], bytes_per_element=2) == 320
    assert kv_cache_bytes(SMALL, [10, 6, 4], bytes_per_element=4) == 640
    # LLaVA-3D-7B (Vicuna-7B, no GQA): 2·32·128 elements · 2 bytes = 16 KiB per entry per layer;
    # 2,560 spatial + 100 text tokens in all 32 layers: 2660 · 32 · 16384 = 1,394,606,080 bytes.
    vicuna = ModelShape(num_layers=32, hidden=4096, intermediate=11008, num_heads=32, num_kv_heads=32,
                        head_dim=128, vocab=32000)
    assert kv_cache_bytes(vicuna, [2660] * 32) == 1_394_606_080


def test_from_config_dicts_and_nesting():
    # a Llava-style wrapper: the decoder's sizes live in text_config; no head_dim, no num_key_value_heads
    wrapped = {"model_type": "llava", "text_config": {"num_hidden_layers": 4, "hidden_size": 96,
                                                      "intermediate_size": 256, "num_attention_heads": 6,
                                                      "vocab_size": 500}}
    assert ModelShape.from_config(wrapped) == ModelShape(num_layers=4, hidden=96, intermediate=256, num_heads=6,
                                                         num_kv_heads=6, head_dim=16, vocab=500)
    # an explicit head_dim wins over hidden // heads (Gemma- and Qwen3-style decoders set it apart)
    explicit = dict(wrapped["text_config"], head_dim=32, num_key_value_heads=2)
    assert ModelShape.from_config(explicit).head_dim == 32
    assert ModelShape.from_config(explicit).num_kv_heads == 2
    assert ModelShape.from_config(llama_config()) == ModelShape.from_config(llama_config().to_dict())


@pytest.mark.parametrize("call, message", [
    (lambda: ModelShape.from_config({"hidden_size": 8}), "num_attention_heads"),
    (lambda: ModelShape(2, 8, 16, 3, 2, 4, 10), "multiple of num_kv_heads"),
    (lambda: prefill_flops(SMALL, [10, 6]), "one count per decoder layer"),
    (lambda: prefill_flops(SMALL, [10, 6, -1]), "non-negative"),
    (lambda: prefill_flops(SMALL, [10, 6, 4.5]), "whole token counts"),
    (lambda: decode_flops(SMALL, [3, 2, 0]), ">= 1"),
    (lambda: kv_cache_bytes(SMALL, [1, 1, 1], bytes_per_element=0), "bytes_per_element"),
])
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_causal_attention_counts_only_unmasked_pairs():
    shape = ModelShape(num_layers=1, hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4, vocab=10)
    dense = layer_flops(shape, 5, 5)
    causal = layer_flops(shape, 5, 5, causal=True)
    # 5 queries over 5 keys: 25 pairs dense, 15 (= 5·6/2) causal; QKᵀ and AV cost 2·H·d per pair each
    assert dense - causal == 2 * 2 * 2 * (25 - 15) * 4
    assert layer_flops(shape, 1, 9, causal=True) == layer_flops(shape, 1, 9)  # one query sees every key
