"""DivPrune before the LLM (as released) against `divprune` here (selected from layer 0's input, dropped from layer 1),
on the shipped testbed: how often the two answer alike, and each one's exact match.

    python benchmarks/divprune_input_level.py --questions 200 --ratios 0.098 0.2 0.4 --out divprune_input_level.json

Both keep the same tokens (tests/test_fidelity.py). Released: the kept spatial tokens' embeddings, with the text
around them, form a shorter input that the unpruned model answers from position 0 (vbdi/divprune llava_arch.py
:366-386). Here: the pruned model answers the full input; its layer 0 sees every token, layers 1.. the kept ones
at renumbered positions. Greedy, at most 4 new tokens, one question at a time (no padding on either side).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import adatoken
from adatoken import testbed
from adatoken.core import selection
from adatoken.eval import exact_match


@torch.inference_mode()
def input_level_answer(model, sample, ratio: float, max_new_tokens: int) -> str:
    inputs = model.build_inputs([sample])
    spatial = inputs["spatial_mask"][0]
    slots = spatial.nonzero().flatten()
    order = selection.max_min_order(inputs["inputs_embeds"][0, slots], int(round(ratio * len(slots))))
    keep = torch.cat(((~spatial).nonzero().flatten(), slots[order])).sort().values
    out = model.llm.generate(inputs_embeds=inputs["inputs_embeds"][:, keep], attention_mask=torch.ones(1, len(keep),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.tokenizer.pad_token_id, eos_token_id=model.tokenizer.eos_token_id)
    return model.decode_answer(out[0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200, help="first N questions of the test split")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.098, 0.2, 0.4])
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--out", default="divprune_input_level.json")
    args = parser.parse_args()
    started = time.perf_counter()
    model = testbed.load()
    samples = testbed.load_split("test", cfg=model.spatial_config)[: args.questions]
    rows = []
    for ratio in args.ratios:
        released = [input_level_answer(model, s, ratio, args.max_new_tokens) for s in samples]
        adatoken.prune(model.llm, "divprune", ratio=ratio)
        ours = [model.answer([s], max_new_tokens=args.max_new_tokens)[0] for s in samples]
        adatoken.unprune(model.llm)
        em = lambda answers: sum(exact_match(a, s.answers) for a, s in zip(answers, samples)) / len(samples)  # noqa: E731
        rows.append({"ratio": ratio, "questions": len(samples),
                     "same_answer": sum(a == b for a, b in zip(released, ours)) / len(samples),
                     "em_released_input_level": em(released), "em_ours_layer1": em(ours)})
        print(json.dumps(rows[-1]))
    options = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                       for k, v in vars(args).items())
    result = {"rows": rows, "command": f"python benchmarks/divprune_input_level.py {options}",
              "seconds": round(time.perf_counter() - started, 1)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
