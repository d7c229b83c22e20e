"""`adatoken demo`: AdaToken-3D end to end on the embedded testbed, written up as a report folder.

    adatoken demo                                        # the shipped testbed checkpoint -> report/
    adatoken demo --checkpoint DIR --questions 100 --out runs/demo

Stages, each kept in OUT:
  1. flow   information flow of the unpruned model over calibration questions, measured as
            `adatoken analyze --model testbed` measures it (adatoken.calibration.flow.analyze)     flow.json
  2. fit    an AdaToken-3D schedule fitted to that flow for each retention, as `adatoken fit`
            fits it (eqs. 5-7)                                                       schedules/
  3. eval   none, FastV, PyramidDrop, random and AdaToken-3D (the fitted schedules) at each
            retention on a fixed, seeded subset of the test split, through the resumable eval
            runner: EM with 95 % Wilson intervals, measured tokens per layer, FLOPs         eval/
  4. tasks the paper's Table I on the testbed: the same configs on seeded subsets of the 3D grounding
            and dense captioning test sets (grounding Acc@0.25/0.5, captioning CIDEr@0.5 ...), when
            the checkpoint was trained on them                                    eval-grounding/ eval-captioning/
  5. bench  prefill time of every config beside its analytic FLOPs ratio, on the testbed model and
            on a random model of LLaVA-3D's proportions (interleaved rounds, medians)     bench/
  6. report figures (redrawn only when a result they show changed), then report.md (tables, the
            figures, a reading computed from the numbers) and report.json
Calibration reads only the calib split; test questions appear only in stages 3 to 5.

A re-run reuses a stage when everything it depends on is unchanged. OUT/cache.json keeps each
stage's key (checkpoint digest, sizes, seeds, the digest of the stage's inputs) and is written only
once the stage's files are complete, so a changed setting or a killed stage is computed again; the
eval stage resumes mid-sweep (it adds configs, e.g. a new retention, to what is on disk). --fresh
recomputes everything.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adatoken.core.artifacts import read_json, write_json_atomic, write_text_atomic

# The paper's 0.1, 0.2 and 0.4, and 0.6 (all reachable on the 32-layer testbed: layers 0-1 alone hold 1/16).
DEFAULT_RETENTIONS = [0.1, 0.2, 0.4, 0.6]
# Testbed answers are one word: 4 tokens show a wrong, longer answer without paying for rambling.
MAX_NEW_TOKENS = 4
# A grounding answer is six coordinate words and the end of the answer; the longest caption six words and the end.
TASK_MAX_NEW_TOKENS = {"grounding": 7, "captioning": 8}
FIT_OPTIONS = {"first_layer": 2, "smooth_lambda": 1.0}  # `adatoken fit`'s defaults
BENCH_SHAPE = "llava3d-mini"  # LLaVA-3D-7B's depth and head size at hidden 256 (adatoken.core.shapes)
BENCH_TEXT_TOKENS = 60  # system + prompt around the spatial tokens, as `adatoken bench` lays them out


@dataclass
class DemoOptions:
    """What `adatoken demo` runs (its flags, one field each); bad values are refused before any work."""

    checkpoint: str | None = None      # testbed checkpoint folder; None: the one shipped in the package
    out: str = "report"                # report folder; also holds every stage's results
    # test questions: a fixed, seeded subset of the test split (60 keeps `make demo` under 5 minutes on 2 cores
    # with the 32-layer testbed; docs/results/testbed.md has 600)
    questions: int = 60
    calib_questions: int = 32          # calibration questions for the information-flow analysis
    task_questions: int = 40           # grounding expressions and captioned objects for Table I (0: none)
    retentions: list[float] = field(default_factory=lambda: list(DEFAULT_RETENTIONS))
    batch_size: int = 32               # questions per generate call
    seed: int = 0                      # seed of the test subset
    bench_spatial: int = 1024          # spatial tokens fed to the LLaVA-3D-proportioned model
    bench_repeats: int = 3             # timed prefill rounds per benchmark after a warm-up round
    skip_bench: bool = False           # leave out the prefill benchmark (stage 4)
    threads: int = 1                   # torch CPU threads; 1 keeps timings steady on a shared machine
    fresh: bool = False                # recompute every stage, ignoring what OUT holds
    no_progress: bool = False          # no progress bars
    command: str = "adatoken demo"     # the command line that reproduces this run, for the report

    def __post_init__(self):
        for name in ("questions", "calib_questions", "batch_size", "bench_spatial", "bench_repeats", "threads"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.task_questions < 0:
            raise ValueError(f"--task-questions must be at least 0 (0 leaves Table I out), got {self.task_questions}")
        bad = [r for r in self.retentions if not 0 < r <= 1]
        if bad:
            raise ValueError(f"--retentions must lie in (0, 1] (mean share of spatial tokens kept), got {bad}")
        if len(set(self.retentions)) != len(self.retentions):
            raise ValueError(f"--retentions must not repeat, got {self.retentions}")


def run_demo(options: DemoOptions) -> list[Path]:
    """Every stage, then the report; prints the accuracy table and the reading. Returns the files written."""
    from adatoken.apps.demo import report as demo_report

    started = time.perf_counter()
    torch.set_num_threads(options.threads)
    demo = Demo(options)
    flow = demo.flow()
    schedules, fit_errors = demo.fit(flow)
    configs, subset, predictions = demo.evaluate(schedules, fit_errors)
    tasks, tasks_note = demo.table_one(configs)
    bench_results = {} if options.skip_bench else demo.bench(configs, subset[0])
    results = demo_report.DemoResults(
        context=demo.context(len(subset), time.perf_counter() - started), flow=flow, schedules=schedules,
        fit_errors=fit_errors, configs=configs, predictions=predictions, tasks=tasks, tasks_note=tasks_note,
        bench=bench_results, stages=demo.cache.log)
    figures = [demo.out / name for name in demo_report.figure_names(results)]
    with demo.cache.stage("figures", {"inputs": file_digest(*demo.result_files())}, *figures) as reused:
        if not reused:
            demo_report.draw_figures(demo.out, results)
    paths = demo_report.write(demo.out, results, figures)
    print("\n" + demo_report.accuracy_table(results.rows))
    print("\n" + "\n".join(f"- {line}" for line in results.reading))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return paths


class StageCache:
    """OUT/cache.json: the key each stage's files were computed under.

    A stage is reused when its key is unchanged and its files exist. Its key is recorded only after
    its files are written, so a run killed mid-stage computes that stage again.
    """

    def __init__(self, out: Path, fresh: bool):
        self.path = out / "cache.json"
        self.keys = {} if fresh or not self.path.is_file() else read_json(self.path, "the demo's stage cache")
        self.log: dict[str, dict] = {}  # stage -> {"reused": bool, "seconds": float}: for the report

    @contextmanager
    def stage(self, name: str, key, *files: Path):
        """`with cache.stage(name, key, *files) as reused:` compute the files unless reused."""
        start = time.perf_counter()
        key = json.loads(json.dumps(key))  # as it will read back from disk
        reused = self.keys.get(name) == key and all(Path(f).exists() for f in files)
        more = f" and {len(files) - 1} more file(s)" if len(files) > 1 else ""
        print(f"[{name}] " + (f"reused {files[0]}{more} (same settings as before)" if reused else "computing"),
              flush=True)
        yield reused
        if not reused:
            self.record(name, key)
        self.log[name] = {"reused": reused, "seconds": round(time.perf_counter() - start, 2)}

    def record(self, name: str, key) -> None:
        self.keys[name] = json.loads(json.dumps(key))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.keys, indent=1)  # a kill leaves the old keys or the new ones


def file_digest(*paths: Path) -> str:
    """sha256 over the names and bytes of the files, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def checkpoint_digest(folder: Path) -> str:
    """A testbed checkpoint's identity: every file in its folder (weights, tokenizer, testbed.json)."""
    if not (folder / "testbed.json").is_file():
        raise FileNotFoundError(f"no testbed checkpoint in {folder}: testbed.json is missing "
                                "(train one with `adatoken testbed train`, or pass --checkpoint DIR)")
    return file_digest(*sorted(p for p in folder.iterdir() if p.is_file()))


class Demo:
    """The stages. Each returns its result, computing it only when OUT does not hold it already."""

    def __init__(self, options: DemoOptions):
        from adatoken.testbed.model import SHIPPED_CHECKPOINT

        self.options = options
        self.out = Path(options.out)
        self.checkpoint = Path(options.checkpoint).resolve() if options.checkpoint else SHIPPED_CHECKPOINT
        self.digest = checkpoint_digest(self.checkpoint)
        self.num_layers = json.loads((self.checkpoint / "testbed.json").read_text())["model"]["num_layers"]
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.out, options.fresh)
        self.progress = not options.no_progress

    @cached_property
    def model(self):
        """The testbed model, loaded on first use: a run that reuses every stage never loads it."""
        from adatoken import testbed

        print(f"loading {self.checkpoint}", flush=True)
        return testbed.load(self.checkpoint)

    # ----- 1. information flow on calibration questions --------------------------------------------------
    def flow(self):
        from adatoken.calibration.flow import FlowParams, FlowReport, analyze
        from adatoken.testbed.calibration import flow_samples

        path = self.out / "flow.json"
        key = {"checkpoint": self.digest, "calib_questions": self.options.calib_questions,
               "params": asdict(FlowParams())}
        with self.cache.stage("flow", key, path) as reused:
            if not reused:
                samples = flow_samples(self.model, self.options.calib_questions)
                analyze(self.model.llm, samples, FlowParams(), progress=self.progress).save(path)
        return FlowReport.load(path)

    # ----- 2. one fitted schedule per retention ------------------------------------------------------------
    def fit(self, flow) -> tuple[dict, dict[float, str]]:
        """Schedules keyed as the eval runner keys them, and the reason for each retention that could not be fitted."""
        from adatoken.calibration.fit import fit_schedule
        from adatoken.eval.runner import load_schedules

        folder = self.out / "schedules"
        paths = {r: folder / f"schedule-{r:g}.json" for r in self.options.retentions}
        failed_path = folder / "failed.json"  # retention -> why fit_schedule refused it
        failed = json.loads(failed_path.read_text()) if failed_path.is_file() else {}
        expected = [failed_path] + [p for r, p in paths.items() if f"{r:g}" not in failed]
        key = {"flow": file_digest(self.out / "flow.json"), "retentions": self.options.retentions, **FIT_OPTIONS}
        with self.cache.stage("fit", key, *expected) as reused:
            if not reused:
                folder.mkdir(parents=True, exist_ok=True)
                failed = {}
                for retention, path in tqdm(paths.items(), desc="fit schedules", unit="retention",
                                            disable=not self.progress):
                    try:
                        fit_schedule(flow.inf, flow.num_layers, retention=retention, **FIT_OPTIONS).save(path)
                    except ValueError as err:  # e.g. below first_layer / num_layers: say so in the report
                        failed[f"{retention:g}"] = str(err)
                        path.unlink(missing_ok=True)
                write_json_atomic(failed_path, failed, indent=1)
        fitted = [p for r, p in paths.items() if f"{r:g}" not in failed]
        return (load_schedules(fitted) if fitted else {}), {float(r): why for r, why in failed.items()}

    # ----- 3. accuracy of every method at every retention on the test subset ------------------------------
    def sweep(self, num_layers: int, schedules: dict | None, fit_errors: dict[float, str]) -> list:
        from adatoken.eval.runner import default_methods, sweep_configs

        configs = sweep_configs(default_methods(), self.options.retentions, num_layers, schedules)
        return [replace(c, skipped=f"no schedule could be fitted: {fit_errors[c.retention]}")
                if c.method == "adatoken3d" and schedules is not None and c.retention in fit_errors else c
                for c in configs]

    def test_subset(self) -> list:
        """The fixed, seeded subset of the test split (QARecords)."""
        from adatoken.testbed.answerer import load_testbed

        return self._subset("questions", self.out / "eval", self.options.questions,
                            lambda: load_testbed(self.checkpoint, split="test"))

    def _subset(self, stage: str, folder: Path, size: int, load) -> list:
        """A seeded subset of `load()`'s records, kept in folder/questions.json so a re-run need not redraw every
        scene."""
        from adatoken.eval.datasets import QARecord
        from adatoken.eval.runner import select_subset

        path = folder / "questions.json"
        key = {"checkpoint": self.digest, "questions": size, "seed": self.options.seed}
        with self.cache.stage(stage, key, path) as reused:
            if not reused:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, [asdict(r) for r in select_subset(load(), size, self.options.seed)], indent=1)
        return [QARecord(**r) for r in json.loads(path.read_text())]

    def evaluate(self, schedules: dict, fit_errors: dict[float, str]):
        """(sweep configs, the test subset, each runnable config's prediction rows)."""
        subset = self.test_subset()
        configs = self.sweep(self.num_layers, schedules, fit_errors)
        return configs, subset, self._evaluate("eval", self.out / "eval", "testbed", subset, configs, MAX_NEW_TOKENS)

    def _evaluate(self, stage: str, folder: Path, dataset: str, subset: list, configs: list,
                  max_new_tokens: int) -> dict[str, list[dict]]:
        """Each runnable config's prediction rows on `subset`, through the resumable eval runner in `folder`."""
        from adatoken.eval.runner import collect, evaluate, read_predictions
        from adatoken.testbed.answerer import TestbedAnswerer

        settings = {"model": "testbed", "checkpoint": str(self.checkpoint), "checkpoint_sha256": self.digest,
                    "dataset": dataset, "split": "test", "questions": len(subset), "seed": self.options.seed}
        key = {"settings": {**settings, "batch_size": self.options.batch_size, "max_new_tokens": max_new_tokens},
               "configs": {c.key: c.prune.to_dict() for c in configs if c.skipped is None}}
        key = json.loads(json.dumps(key))
        # Predictions on disk stay usable when the settings match and no config changed under its name
        # (a refitted schedule does); new configs are added to them.
        previous = self.cache.keys.get(stage)
        usable = previous is not None and previous["settings"] == key["settings"] and all(
            previous["configs"].get(name, config) == config for name, config in key["configs"].items())
        on_disk = read_predictions(folder / "predictions") if usable and (folder / "predictions").is_dir() else {}
        wanted = [(name, r.question_id) for name in key["configs"] for r in subset]
        missing = sum(pair not in on_disk for pair in wanted)
        start = time.perf_counter()
        if missing == 0:
            print(f"[{stage}] reused all {len(wanted)} predictions in {folder} (same settings as before)", flush=True)
            predictions = collect(folder / "predictions", subset, configs)
        else:
            print(f"[{stage}] {len(subset)} questions x {len(key['configs'])} configs: "
                  f"{'computing' if not on_disk else f'resuming, {len(wanted) - missing} reused'}", flush=True)
            self.cache.record(stage, {**key, "configs": {**(previous["configs"] if usable else {}), **key["configs"]}})
            predictions = evaluate(TestbedAnswerer(self.model), subset, configs, folder, settings,
                                   batch_size=self.options.batch_size, max_new_tokens=max_new_tokens,
                                   fresh=not usable, progress=self.progress)
        self.cache.log[stage] = {"reused": missing == 0, "seconds": round(time.perf_counter() - start, 2),
                                 "predictions_computed": missing, "predictions_reused": len(wanted) - missing}
        return predictions

    # ----- 4. Table I: grounding and captioning -----------------------------------------------------------
    def table_one(self, configs: list) -> tuple[dict[str, dict[str, list[dict]]], str | None]:
        """task -> each runnable config's prediction rows on a seeded subset of the task's test set, and why
        there are none when Table I is not run (said once, on the terminal and in the report)."""
        from adatoken.testbed.answerer import load_testbed_task
        from adatoken.testbed.referring import CLICK, TASKS_3D

        if self.options.task_questions == 0:
            return {}, "not run (--task-questions 0)"
        vocabulary = json.loads((self.checkpoint / "tokenizer.json").read_text())["model"]["vocab"]
        if CLICK not in vocabulary:
            note = (f"not run: {self.checkpoint} was never trained on 3D grounding and dense captioning (its "
                    "vocabulary has no click or coordinate words); fine-tune it with `adatoken testbed train "
                    "--finetune-from CHECKPOINT --grounding-turns 6 --captioning-turns 4`, or pass "
                    "--task-questions 0 to leave Table I out")
            print(f"[tasks] {note}", flush=True)
            return {}, note
        tasks = {}
        for task in TASKS_3D:
            folder = self.out / f"eval-{task}"
            subset = self._subset(f"questions {task}", folder, self.options.task_questions,
                                  lambda task=task: load_testbed_task(task, self.checkpoint, split="test"))
            tasks[task] = self._evaluate(f"eval {task}", folder, f"testbed-{task}", subset, configs,
                                         TASK_MAX_NEW_TOKENS[task])
        return tasks, None

    # ----- 5. prefill speed against FLOPs ------------------------------------------------------------------
    def bench(self, configs: list, question) -> dict[str, dict]:
        """Model label -> an `adatoken bench`-style result: the testbed model on one test question with the
        eval's configs, and the LLaVA-3D-proportioned random model (adatoken3d on its eq.-5 curve: the
        fitted schedules have the testbed's depth)."""
        from adatoken.apps.bench import Setup, build_setup
        from adatoken.core import models
        from adatoken.testbed.answerer import as_sample

        folder = self.out / "bench"
        folder.mkdir(parents=True, exist_ok=True)
        timing = {"repeats": self.options.bench_repeats, "threads": self.options.threads}
        results = {}

        label, path = f"testbed ({self.num_layers} layers)", folder / "testbed.json"
        key = {"checkpoint": self.digest, "question": question.question_id, **timing,
               "configs": {c.key: c.prune.to_dict() if c.prune else c.skipped for c in configs}}
        with self.cache.stage("bench testbed", key, path) as reused:
            if not reused:
                inputs = self.model.build_inputs([as_sample(question)])
                spatial, points = inputs.pop("spatial_mask"), inputs.pop("spatial_points")
                _write_bench(path, bench_configs(Setup(self.model.llm, inputs, spatial, "cpu", points), configs, label,
                                                 self.options.bench_repeats, self.progress))
        results[label] = json.loads(path.read_text())

        mini = models.shape(BENCH_SHAPE).config
        shape = mini["num_hidden_layers"], mini["hidden_size"]
        label, path = f"LLaVA-3D-proportioned ({shape[0]} layers, hidden {shape[1]})", folder / "llava3d-mini.json"
        with warnings.catch_warnings():  # a random-weight model has no calibration: the generic curve, on purpose
            warnings.filterwarnings("ignore", message="adatoken3d is running without a fitted schedule")
            mini_configs = self.sweep(shape[0], None, {})
        key = {"shape": mini, "spatial": self.options.bench_spatial, "text": BENCH_TEXT_TOKENS, **timing,
               "configs": {c.key: c.prune.to_dict() if c.prune else c.skipped for c in mini_configs}}
        with self.cache.stage("bench llava3d-mini", key, path) as reused:
            if not reused:
                setup = build_setup(models.build(BENCH_SHAPE), 1, self.options.bench_spatial, BENCH_TEXT_TOKENS, "cpu")
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="adatoken3d is running without a fitted schedule")
                    rows = bench_configs(setup, mini_configs, label, self.options.bench_repeats, self.progress)
                _write_bench(path, rows)
        results[label] = json.loads(path.read_text())
        return results

    def result_files(self) -> list[Path]:
        """The files the figures are drawn from: they are redrawn when any of these changed."""
        files = [self.out / "flow.json", *sorted((self.out / "schedules").glob("*.json"))]
        for folder in ("eval", "eval-grounding", "eval-captioning"):
            files += sorted((self.out / folder).glob("questions.json"))
            files += sorted((self.out / folder / "predictions").glob("rank*.jsonl"))
        return files + ([] if self.options.skip_bench else sorted((self.out / "bench").glob("*.json")))

    def context(self, num_questions: int, seconds: float) -> dict:
        """What this run was, for the top of the report."""
        a = self.options
        return {
            "checkpoint": str(self.checkpoint), "checkpoint_sha256": self.digest[:16],
            "model": f"testbed ({self.num_layers} decoder layers)",
            "calibration": f"first {a.calib_questions} questions of the calib split",
            "evaluation": f"{num_questions} questions of the test split (seeded subset, seed {a.seed}); greedy, "
                          f"at most {MAX_NEW_TOKENS} new tokens, batches of {a.batch_size}",
            "Table I": f"{a.task_questions} grounding expressions and {a.task_questions} captioned objects of the "
                       f"testbed's test sets (seeded subsets); at most {TASK_MAX_NEW_TOKENS['grounding']} / "
                       f"{TASK_MAX_NEW_TOKENS['captioning']} new tokens" if a.task_questions else "not run",
            "retentions": " ".join(f"{r:g}" for r in a.retentions),
            "threads": a.threads, "torch": torch.__version__, "machine": platform.machine(),
            "command": a.command,
            "wall time": f"{seconds:.0f} s (this invocation, before the report)",
        }


def bench_configs(setup, configs: list, label: str, repeats: int, progress: bool) -> dict:
    """`adatoken bench`'s interleaved prefill sweep over the eval's configs; skipped ones keep their reason."""
    from adatoken.apps.bench import run_sweep

    runnable = {c.key: {"config": c.prune} for c in configs if c.skipped is None}  # `none` first: the baseline
    with tqdm(total=len(runnable) * (repeats + 1), desc=f"bench {label}", unit="prefill", disable=not progress) as bar:
        rows = run_sweep(setup, runnable, repeats, new_tokens=0, progress=bar)
    rows += [{"config": c.key, "method": c.method, "skipped": c.skipped} for c in configs if c.skipped is not None]
    batch, length = setup.spatial.shape
    spatial = int(setup.spatial.sum())
    return {"shape": label, "config": setup.model.config.to_diff_dict(), "device": setup.device,
            "device_name": platform.machine(), "threads": torch.get_num_threads(), "dtype": "float32",
            "batch": batch, "spatial_tokens": spatial, "text_tokens": length - spatial, "new_tokens": 0,
            "repeats": repeats, "torch": torch.__version__, "rows": rows}


def _write_bench(path: Path, result: dict) -> None:
    from adatoken.apps.bench import markdown

    write_text_atomic(path.with_suffix(".md"), markdown(result))
    write_json_atomic(path, result, indent=1)  # last: its presence marks the stage done
