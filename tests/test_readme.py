"""The README's "Use it on your model" code runs as written, on tiny random models, so it cannot rot."""
import re
from pathlib import Path

import numpy as np
import torch

import adatoken
from adatoken.calibration.fit import fit_schedule
from adatoken.core import adapters
from adatoken.core.runtime import STATE_ATTR
from tiny_models import build_model, make_prompt, model_inputs

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## Use it on your model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_use_it_on_your_model_snippet_runs(tmp_path, monkeypatch):
    llava = build_model("llava", "sdpa")
    # the snippet prunes with a fitted schedule from `adatoken fit`: one for this model's depth, where it looks
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib").mkdir()
    num_layers = adapters.resolve(llava).num_layers
    fit_schedule(np.exp(-0.3 * np.arange(num_layers)), num_layers, retention=0.5).save("calib/schedule.json")
    ids, _ = make_prompt(16)
    llm = build_model("llama", "sdpa")
    llm_ids, spatial_mask = make_prompt(40)
    llm_inputs = model_inputs(llm, "llama", llm_ids)
    namespace = {"model": llava, "inputs": model_inputs(llava, "llava", ids), "llm": llm,
                 "spatial_mask": spatial_mask, "embeds": llm_inputs["inputs_embeds"],
                 "attention_mask": llm_inputs["attention_mask"]}
    with torch.no_grad():
        exec(compile(readme_snippet(), str(README), "exec"), namespace)
    assert not hasattr(llava, STATE_ATTR)  # the snippet unpruned it
    kept = [layer[0] for layer in adatoken.last_stats(llm).spatial_in]
    assert kept[:2] == [40, 40] and kept[2:] == [20] * 4  # fastv, layer 2, half of the spatial tokens
    assert namespace["out"].shape[1] > 0  # generate with inputs_embeds returns only the new tokens
