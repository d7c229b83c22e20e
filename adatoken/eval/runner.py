"""The evaluation sweep: one model, many pruning configurations, every prediction on disk as it is made.

    configs = sweep_configs(["none", "fastv", "adatoken3d"], [0.1, 0.2, 0.4], num_layers)
    predictions = evaluate(answerer, records, configs, "runs/eval", settings, batch_size=16, max_new_tokens=8)

Questions are cut into fixed batches (batch j = records[j*B : (j+1)*B]) and batch j belongs to rank
j % world_size. A batch therefore holds the same questions, padded the same way, however many
processes run and however often the sweep is resumed, so the predictions depend on neither.

Each rank appends to its own OUT/predictions/rank{r}.jsonl, one line per (config, question), and
flushes and fsyncs after every batch. A kill can leave at most a torn last line: its owner truncates
it before appending again and every reader ignores it. A re-run skips each (config, question) already
on disk; a batch with some questions missing is answered again whole (same padding) and only the
missing lines are written. OUT/run.json records what the predictions were made with, and a re-run
with different settings is refused instead of mixing the two.

Under torchrun or accelerate (WORLD_SIZE > 1) the ranks meet at a gloo barrier at the end and rank 0
gathers every file.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from adatoken.core.artifacts import read_json, write_json_atomic
from adatoken.core.config import PruneConfig
from adatoken.core.methods import METHODS, method_names, methods_in_report_order
from adatoken.core.methods.adatoken3d import AdaToken3D
from adatoken.core.runtime import last_stats, prune, unprune
from adatoken.core.schedule import Schedule
from adatoken.eval.datasets import QARecord

RUN_FORMAT = "adatoken.eval/v1"
# Files of a finished run; `--fresh` removes them with the predictions so nothing stale survives a crash.
REPORT_FILES = ("metrics.json", "report.md", "report.json", "accuracy_vs_flops.png")
# Ranks wait for each other only at the end, where they differ by at most one batch per config.
BARRIER_TIMEOUT = timedelta(hours=2)


class Answerer(Protocol):
    """What the runner needs of a model.

    `llm` is the decoder `adatoken.prune` hooks. `answer` greedily answers a batch of questions in ONE
    generate call on `llm`, inside `adatoken.spatial_tokens(llm, mask)` when the spatial tokens are
    not found from input ids, so that `adatoken.last_stats(llm)` afterwards describes every sample of
    the batch, in order.
    """

    llm: nn.Module

    def answer(self, records: Sequence[QARecord], max_new_tokens: int) -> list[str]: ...


# model name -> loader(checkpoint folder or None, device) -> (Answerer, the checkpoint folder used).
# Filled by the packages that provide models (the testbed registers "testbed" when imported).
ANSWERERS: dict[str, Callable[[str | None, torch.device], tuple[Answerer, Path]]] = {}


def register_answerer(name: str, loader: Callable[[str | None, torch.device], tuple[Answerer, Path]]) -> None:
    ANSWERERS[name] = loader


def default_methods() -> list[str]:
    """Every registered method, as a sweep runs and reports them: `none`, baselines, controls, adatoken3d."""
    return methods_in_report_order()


# --- what to run -----------------------------------------------------------------------------------
BUDGETS = ("retention", "final_keep")


@dataclass(frozen=True)
class SweepConfig:
    """One row of the sweep: a method at a budget value (None for `none`), or the reason it cannot run.
    `budget` says what the value is: the mean spatial retention over layers, or (final_keep) the share
    adatoken3d's curve keeps at the last layer, the other methods running at that curve's mean retention."""

    method: str
    retention: float | None
    prune: PruneConfig | None
    skipped: str | None = None
    budget: str = "retention"

    @property
    def label(self) -> str:
        """The budget as tables print it: "0.4", or "final 0.1"."""
        if self.retention is None:
            return "1"
        return f"{self.retention:g}" if self.budget == "retention" else f"final {self.retention:g}"

    @property
    def key(self) -> str:
        if self.retention is None:
            return self.method
        return f"{self.method}@{self.retention:g}" if self.budget == "retention" else \
            f"{self.method}@final{self.retention:g}"


def sweep_configs(methods: Sequence[str], retentions: Sequence[float], num_layers: int,
                  schedules: dict[float, Schedule] | None = None, budget: str = "retention") -> list[SweepConfig]:
    """`none` once, every other method at every budget value. A method may name a variant, as
    `adatoken3d:released`. adatoken3d uses the fitted schedule of that value when `schedules` is
    given (see `load_schedules`), its eq.-5 curve otherwise; the controls built on its schedule (`random`,
    `coverage`) always get the very schedule adatoken3d (variant paper) uses there, so that they differ only
    in which tokens they keep.

    budget="final_keep" reads the values as the share kept at the last layer (the paper's Table II
    reading, docs/method.md): adatoken3d's curve (fitted with `adatoken fit --final-keep`, or the
    endpoint curve) ends there, and every method without a curve of its own runs at that curve's mean
    retention, so that each row costs what adatoken3d's does.

    A config the model's depth cannot reach (e.g. FastV at K=2 below retention 2/num_layers) is kept
    as skipped, with the method's own explanation; an invalid name or value raises ValueError.
    """
    unknown = [m for m in methods if m.split(":")[0] not in method_names()]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(method_names())} "
                         "(adatoken3d:paper and adatoken3d:released name its variants)")
    if len(set(methods)) != len(methods) or len(set(retentions)) != len(retentions):
        raise ValueError(f"methods and budget values must not repeat, got {list(methods)} and {list(retentions)}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    configs = []
    for spec in methods:
        method, _, variant = spec.partition(":")
        if method == "none":
            configs.append(SweepConfig("none", None, PruneConfig("none")))
            continue
        params = {"variant": variant} if variant else {}
        for value in retentions:
            curve = {budget: value}  # adatoken3d's budget at this value
            if schedules is not None:
                schedule = schedules.get(_retention_key(value))
                if schedule is None:
                    have = ", ".join(f"{r:g}" for r in sorted(schedules)) or "none"
                    why = f"no fitted schedule for {budget} {value:g} (schedules given for: {have})"
                    if _runs_adatoken3d_schedule(method) or budget == "final_keep":
                        configs.append(SweepConfig(spec, value, None, why, budget))
                        continue
                else:
                    curve = {"schedule": schedule}
            if _runs_adatoken3d_schedule(method) and (schedules is not None or budget == "final_keep"):
                config = PruneConfig(method, **params, **curve)
            elif budget == "final_keep":
                config = PruneConfig(method, **params, retention=_curve_retention(curve, num_layers))
            else:
                config = PruneConfig(method, **params, retention=value)
            configs.append(SweepConfig(spec, value, config, _why_infeasible(config, num_layers), budget))
    return configs


def _runs_adatoken3d_schedule(method: str) -> bool:
    """adatoken3d and the controls built on its schedule (random, coverage), which differ from it only in ranking."""
    return issubclass(METHODS[method], AdaToken3D)


def _curve_retention(curve: dict, num_layers: int) -> float:
    """The mean retention of adatoken3d's (paper) curve under this budget: what equal cost means."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the uncalibrated warning is adatoken3d's row's to give
        return round(PruneConfig("adatoken3d", **curve).build().schedule(num_layers).retention, 4)


def _why_infeasible(config: PruneConfig, num_layers: int) -> str | None:
    try:
        config.build().schedule(num_layers)
    except ValueError as exc:
        return str(exc)
    return None


def _retention_key(retention: float) -> float:
    return round(float(retention), 3)


def load_schedules(paths: Sequence[str | Path], budget: str = "retention") -> dict[float, Schedule]:
    """Schedule JSONs (files, or folders of *.json) keyed by the budget value they were fitted for
    (meta "requested_retention", else their mean keep; or meta "requested_final_keep", else their last
    layer's keep), rounded to 3 decimals."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise FileNotFoundError(f"no schedule JSON files (*.json) in {path}")
            files += found
        else:
            files.append(path)
    schedules: dict[float, Schedule] = {}
    origin: dict[float, Path] = {}
    for file in files:
        schedule = Schedule.load(file)
        value = schedule.meta.get("requested_retention", schedule.retention) if budget == "retention" else \
            schedule.meta.get("requested_final_keep", schedule.final_keep)
        key = _retention_key(value)
        if key in schedules:
            raise ValueError(f"two schedules for {budget} {key:g}: {origin[key]} and {file}; pass one per value")
        schedules[key], origin[key] = schedule, file
    return schedules


def select_subset(records: Sequence[QARecord], limit: int | None, seed: int = 0) -> list[QARecord]:
    """The first `limit` records of a seeded shuffle, kept in dataset order (questions about one scene
    stay together). A smaller limit gives a subset of a larger one's questions."""
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 1:
        raise ValueError(f"limit must be a positive number of questions, got {limit}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:limit])]


# --- the prediction log ----------------------------------------------------------------------------
def log_path(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.jsonl"


def read_log(path: Path) -> list[dict]:
    """The complete lines of one prediction file. A last line without its newline is a write cut short
    by a kill and is left out; a damaged line before it cannot come from a kill and raises."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: after the last newline, torn or empty
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {number} is not valid JSON ({exc.msg}); the file was damaged "
                             "after it was written: delete it or rerun with --fresh") from None
    return rows


def read_predictions(folder: Path) -> dict[tuple[str, str], dict]:
    """Every complete line of every rank's file, by (config key, question_id)."""
    found: dict[tuple[str, str], dict] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for row in read_log(path):
            found.setdefault((row["config"], row["question_id"]), row)
    return found


def cut_torn_tail(path: Path) -> None:
    """Truncate a file after its last newline, so appending never glues a new line onto a torn one."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


def append_rows(log, rows: list[dict]) -> None:
    log.write("".join(json.dumps(row) + "\n" for row in rows))
    log.flush()
    os.fsync(log.fileno())


# --- one rank's share --------------------------------------------------------------------------------
class PrefillTimer:
    """Times the first forward of `llm` after each `reset()`: in `generate`, that call is the prefill."""

    def __init__(self, llm: nn.Module):
        self.llm = llm
        self.seconds: float | None = None
        self._start: float | None = None
        self._handles = [llm.register_forward_pre_hook(self._before), llm.register_forward_hook(self._after)]

    def reset(self) -> None:
        self.seconds, self._start = None, None

    def _sync(self) -> None:
        device = next(self.llm.parameters()).device
        if device.type == "cuda":  # kernels run asynchronously: wait so the clock sees them
            torch.cuda.synchronize(device)

    def _before(self, *_):
        if self._start is None:
            self._sync()
            self._start = time.perf_counter()

    def _after(self, *_):
        if self.seconds is None and self._start is not None:
            self._sync()
            self.seconds = time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def run_shard(answerer: Answerer, records: Sequence[QARecord], configs: Sequence[SweepConfig], folder: Path, *,
              batch_size: int, max_new_tokens: int, rank: int = 0, world_size: int = 1, progress: bool = True) -> None:
    """Answer this rank's batches under every runnable config, appending what is not on disk yet."""
    folder.mkdir(parents=True, exist_ok=True)
    path = log_path(folder, rank)
    cut_torn_tail(path)
    done = set(read_predictions(folder))
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)][rank::world_size]
    work = [(config, batch) for config in configs if config.skipped is None for batch in batches
            if any((config.key, r.question_id) not in done for r in batch)]
    bar = tqdm(total=sum(len(batch) for _, batch in work), unit="question", desc="eval",
               disable=not progress or rank != 0)
    timer = PrefillTimer(answerer.llm)
    current = None
    try:
        with open(path, "a", encoding="utf-8") as log:
            for config, batch in work:
                if config is not current:
                    prune(answerer.llm, config.prune)
                    bar.set_description(config.key)
                    current = config
                timer.reset()
                start = time.perf_counter()
                predictions = answerer.answer(batch, max_new_tokens)
                seconds = time.perf_counter() - start
                stats = last_stats(answerer.llm)
                _check_answers(predictions, stats, batch)
                rows = [_row(config, record, prediction, stats, b, batch, timer.seconds, seconds)
                        for b, (record, prediction) in enumerate(zip(batch, predictions))
                        if (config.key, record.question_id) not in done]
                append_rows(log, rows)
                bar.update(len(batch))
    finally:
        unprune(answerer.llm)
        timer.remove()
        bar.close()


def _check_answers(predictions, stats, batch) -> None:
    if not isinstance(predictions, list) or len(predictions) != len(batch):
        got = len(predictions) if isinstance(predictions, list) else type(predictions).__name__
        raise ValueError(f"answer() returned {got} answers for {len(batch)} questions; "
                         "it must return a list with one string per question")
    if stats.num_samples != len(batch):
        raise ValueError(f"the last prefill on .llm held {stats.num_samples} samples but the batch has {len(batch)}: "
                         "answer() must run the whole batch as one generate call on .llm")


def _row(config: SweepConfig, record: QARecord, prediction: str, stats, b: int, batch, prefill_s, answer_s) -> dict:
    return {
        "config": config.key, "method": config.method, "retention": config.retention,
        "question_id": record.question_id, "prediction": prediction, "references": record.answers,
        "qtype": record.qtype,
        # grounding and captioning records: the object's box, and ScanRefer's unique/multiple subset (report.py)
        **{name: record.extra[name] for name in ("box", "subset") if name in record.extra},
        "spatial_in": [layer[b] for layer in stats.spatial_in],  # spatial tokens entering each layer
        "prefill_flops": stats.prefill_flops(b),
        # the batch this answer came from, and its timings (every sample of a batch shares them)
        "batch": batch[0].question_id, "batch_size": len(batch),
        "batch_prefill_s": prefill_s, "batch_answer_s": answer_s,
    }


# --- the whole sweep, across ranks -------------------------------------------------------------------
def evaluate(answerer: Answerer, records: Sequence[QARecord], configs: Sequence[SweepConfig], out: str | Path,
             settings: dict, *, batch_size: int, max_new_tokens: int, fresh: bool = False,
             progress: bool = True) -> dict[str, list[dict]] | None:
    """Run the sweep, sharded when launched by torchrun/accelerate, resuming what OUT already holds.

    settings: what else the predictions depend on (model, checkpoint, dataset, ...), recorded in
    OUT/run.json; a re-run must agree with it. fresh: start over, deleting earlier predictions and reports.
    Returns, on rank 0, each runnable config's prediction rows in `records` order; None on other ranks.
    """
    if not records:
        raise ValueError("no questions to evaluate: the dataset (or its --limit subset) is empty")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    out = Path(out)
    folder = out / "predictions"
    rank, world_size, started = _init_distributed()
    try:
        manifest = {"format": RUN_FORMAT,
                    "settings": {**settings, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                                 "num_questions": len(records), "question_ids_sha256": _ids_digest(records)},
                    "configs": {c.key: c.prune.to_dict() for c in configs if c.skipped is None}}
        _rank0_first(rank, world_size, lambda: prepare_run(out, manifest, fresh))
        run_shard(answerer, records, configs, folder, batch_size=batch_size, max_new_tokens=max_new_tokens,
                  rank=rank, world_size=world_size, progress=progress)
        if world_size > 1:
            dist.barrier()
        return collect(folder, records, configs) if rank == 0 else None
    finally:
        if started:
            dist.destroy_process_group()


def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) from torchrun's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)  # gloo: barriers only, CPU or GPU
    return dist.get_rank(), dist.get_world_size(), True


def _rank0_first(rank: int, world_size: int, step) -> None:
    """Run `step` on rank 0 while the others wait; if it fails, every rank stops with its message."""
    error = None
    if rank == 0:
        try:
            step()
        except (OSError, ValueError) as exc:
            if world_size == 1:
                raise
            error = f"{type(exc).__name__}: {exc}"
    if world_size > 1:
        message = [error]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise RuntimeError(f"rank 0 could not prepare the run: {message[0]}")


def _ids_digest(records: Sequence[QARecord]) -> str:
    return hashlib.sha256("\n".join(r.question_id for r in records).encode()).hexdigest()


def prepare_run(out: Path, manifest: dict, fresh: bool) -> None:
    """Check OUT/run.json against this run (or start over with `fresh`) and record the run's configs."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    if fresh:
        shutil.rmtree(out / "predictions", ignore_errors=True)
        for name in ("run.json", *REPORT_FILES):
            (out / name).unlink(missing_ok=True)
    configs = dict(manifest["configs"])
    if path.exists():
        previous = read_json(path, f"the manifest of an evaluation run ({RUN_FORMAT})")
        if not isinstance(previous, dict) or previous.get("format") != RUN_FORMAT:
            raise ValueError(f"{path} is not the manifest of an evaluation run (format {RUN_FORMAT}); "
                             "pass --fresh to start over, or another --out")
        if previous.get("settings") != manifest["settings"]:
            changed = sorted(k for k in set(previous.get("settings", {})) | set(manifest["settings"])
                             if previous.get("settings", {}).get(k) != manifest["settings"].get(k))
            raise ValueError(f"{out} holds predictions made with other settings ({', '.join(changed)} differ; "
                             f"see {path}); rerun with the same settings to resume, or pass --fresh or another --out")
        for key, config in previous.get("configs", {}).items():
            if key in configs and configs[key] != config:
                raise ValueError(f"{out} holds predictions for {key} made with another config ({config} there, "
                                 f"{configs[key]} now); pass --fresh or another --out")
            configs.setdefault(key, config)  # earlier configs stay valid: a run may add configs
    write_json_atomic(path, {**manifest, "configs": configs})


def collect(folder: Path, records: Sequence[QARecord], configs: Sequence[SweepConfig]) -> dict[str, list[dict]]:
    """Each runnable config's rows in `records` order, from every rank's file; every one must be there."""
    found = read_predictions(folder)
    result = {}
    for config in configs:
        if config.skipped is not None:
            continue
        missing = [r.question_id for r in records if (config.key, r.question_id) not in found]
        if missing:
            raise ValueError(f"{len(missing)} of {len(records)} predictions of {config.key} are missing from "
                             f"{folder} (first: {missing[0]!r}): the sweep did not finish; run it again to resume")
        result[config.key] = [found[config.key, r.question_id] for r in records]
    return result
