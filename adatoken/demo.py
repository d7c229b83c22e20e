"""`adatoken demo`: prune a small random LLaVA-3D-shaped decoder with every method and show what happens.

A real end-to-end run (no downloads): a random-weight Llama fed `inputs_embeds` laid out
system | spatial | prompt as LLaVA-3D feeds its LLM, pruned generation with the KV cache, and per
method the spatial tokens that entered each layer, the analytic prefill FLOPs and the prefill time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import adatoken

METHODS = [("none", {}), ("fastv", {"layer": 2}), ("pdrop", {}), ("adatoken3d", {}), ("random", {})]


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="prune a small random LLaVA-3D-shaped model with every method",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retention", type=float, default=0.4, help="mean spatial retention over layers (0, 1]")
    parser.add_argument("--spatial", type=int, default=1024, help="spatial tokens in the input")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the random model")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per method (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier timings on a busy machine)")
    parser.set_defaults(func=run)


def build_model(layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=8, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.layers, args.seed)
    system, prompt = 20, 40
    length = system + args.spatial + prompt
    spatial = torch.zeros(1, length, dtype=torch.bool)
    spatial[:, system:system + args.spatial] = True
    embeds = torch.randn(1, length, model.config.hidden_size, generator=torch.Generator().manual_seed(args.seed))
    inputs = {"inputs_embeds": embeds * 0.02, "attention_mask": torch.ones(1, length, dtype=torch.long)}
    print(f"random Llama: {args.layers} layers, hidden 256; input {length} tokens = {system} system + "
          f"{args.spatial} spatial + {prompt} prompt; mean spatial retention {args.retention}\n")

    configs = [(name, params if name == "none" else {**params, "retention": args.retention}) for name, params in METHODS]
    results, reference = {}, None
    for name, params in tqdm(configs, desc="generate", unit="method"):
        adatoken.prune(model, name, **params)
        with torch.inference_mode(), adatoken.spatial_tokens(model, spatial):
            tokens = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False, pad_token_id=0)[0].tolist()
        stats = adatoken.last_stats(model)
        reference = reference or tokens
        kept = [layer[0] for layer in stats.spatial_in]
        results[name] = {"retention": sum(kept) / (len(kept) * args.spatial), "kept": kept, "times": [],
                         "flops": stats.prefill_flops(0), "agree": sum(a == b for a, b in zip(tokens, reference)) / len(reference)}
    # Prefill timing interleaves the methods round by round, so a busy machine slows them all alike.
    for _ in tqdm(range(args.repeats), desc="time prefill", unit="round"):
        for name, params in configs:
            adatoken.prune(model, name, **params)
            with torch.inference_mode(), adatoken.spatial_tokens(model, spatial):
                start = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                results[name]["times"].append(time.perf_counter() - start)
    adatoken.unprune(model)
    rows = [(name, r["retention"], r["kept"], r["flops"], statistics.median(r["times"]), r["agree"])
            for name, r in results.items()]

    base_flops, base_time = rows[0][3], rows[0][4]
    print(f"\n{'method':<11}{'retention':>10}{'TFLOPs':>9}{'FLOPs ratio':>13}{'prefill ms':>12}{'speedup':>9}"
          f"{'same tokens':>13}")
    for name, retention, _, flops, seconds, agree in rows:
        print(f"{name:<11}{retention:>10.3f}{flops / 1e12:>9.3f}{base_flops / flops:>13.2f}{seconds * 1e3:>12.1f}"
              f"{base_time / seconds:>9.2f}{agree:>13.0%}")
    print("\nspatial tokens entering each layer:")
    for name, _, kept, *_ in rows:
        print(f"  {name:<11}{' '.join(f'{k:>4}' for k in kept)}")
    print("\n(random weights: 'same tokens' shows how far each method moves the output, not accuracy;"
          " the testbed measures accuracy)")
    return 0
