"""lm-evaluation-harness as an engine: its tasks run on any model llmpress loads.

lm-eval takes a loaded model through ``HFLM(pretrained=module)``, so a QuantLinear or
LowRankLinear model runs as it is held in memory, with no export. What this module adds:

- **Local tasks that travel.** A task is a registered name (built in, or defined in a folder
  given on the list), a YAML file, or a folder (all the tasks its YAML files define). lm-eval
  resolves a local task's relative ``data_files`` against the working directory; here they are
  resolved against the YAML's own folder when they exist there, so a task folder works from
  anywhere (the member tasks of a local *group* are loaded by lm-eval itself and resolve them
  as it does). Built-in names cost lm-eval's index of its ~15 000 YAML files (seconds), so that
  index is built only when a name is not found among the local tasks, and once per process.
- **Tasks loaded once, run many times.** :class:`TaskSuite` loads the tasks (and their data)
  once; :meth:`TaskSuite.run` evaluates one model with every seed (Python, NumPy, torch, the
  few-shot sampler) set again before the run, so the original and a compressed copy see the
  same prompts, and a model run twice gives the same numbers.
- **Per-item scores kept** for metrics that are means over items, so two runs on the same
  items can be compared pairwise (:func:`paired_se`).
- **Quiet unless asked.** lm-eval logs warnings for a model object, draws progress bars and
  prints bootstrap notices to stdout; :func:`muted` silences all of it for the duration of a
  run unless logging is at INFO or below (``llmpress -v``).

Imported only when tasks are asked for: importing lm-eval costs seconds.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

try:
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.api.metrics import mean as _lm_mean
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    # lm-eval's own YAML reader (``include:`` chains, ``!function`` tags); it has no public one
    from lm_eval.tasks._yaml_loader import load_yaml
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"lm-evaluation-harness is not installed or too old ({e}): pip install 'llmpress[engines]'") from e
if not hasattr(TaskManager, "load"):  # pragma: no cover
    raise ImportError(f"lm-eval {getattr(lm_eval, '__version__', '?')} lacks TaskManager.load: this adapter is written "
                      "for lm-eval 0.4.13")

log = logging.getLogger(__name__)

__all__ = ["TaskError", "TaskSuite", "RunResult", "muted", "paired_se"]

_BUILTIN_DIR = Path(lm_eval.__file__).resolve().parent / "tasks"


class TaskError(ValueError):
    """A task that cannot be found or loaded (its data set unreachable, a bad YAML)."""


# ----------------------------------------------------------------------------- noise


@contextlib.contextmanager
def muted(enabled: bool | None = None) -> Iterator[None]:
    """Silence lm-eval (and the ``datasets`` calls it makes) for the duration of a block.

    ``enabled=None`` decides from llmpress's own logging: quiet unless this module's logger
    would show INFO. What it silences and how, each undone on exit: the ``lm_eval``,
    ``datasets`` and ``transformers.generation`` loggers (raised to ERROR), ``datasets``'
    progress bars, the per-task progress bar lm-eval draws while building requests (it has no
    switch: the ``tqdm`` name in that module is wrapped with ``disable=True``), and prints to
    stdout (bootstrap notices), which go to stderr so that stdout stays clean for ``--json``.
    The model's own progress bars are turned off by :class:`_QuietLM`.
    """
    if enabled is None:
        enabled = not log.isEnabledFor(logging.INFO)
    if not enabled:
        yield
        return
    import datasets
    import lm_eval.api.task as task_mod

    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers.generation")]
    levels = [lg.level for lg in loggers]
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    task_tqdm = task_mod.tqdm
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.utils.logging.disable_progress_bar()
        task_mod.tqdm = lambda *a, **k: task_tqdm(*a, **{**k, "disable": True})
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        task_mod.tqdm = task_tqdm
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


class _QuietLM(HFLM):
    """HFLM whose request loops draw no progress bar when ``show_progress`` is off (lm-eval's
    evaluator never passes ``disable_tqdm``, and the rolling path forces it on)."""

    show_progress: bool = True

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[Any]:
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or not self.show_progress,
                                             override_bs=override_bs)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)


# ----------------------------------------------------------------------------- task specs


def _local_path(x: str, base: Path) -> str:
    """``x`` made absolute against ``base`` when it names something there (a file, a folder or
    a glob that matches); otherwise unchanged (a URL, an absolute path, a path lm-eval's users
    meant relative to the working directory)."""
    if "://" in x or Path(x).is_absolute():
        return x
    p = base / x
    if p.exists() or any(base.glob(x)):
        return str(p)
    return x


def _with_local_data(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """A task config whose relative ``dataset_kwargs.data_files`` point into ``base``."""
    kw = dict(cfg.get("dataset_kwargs") or {})
    files = kw.get("data_files")
    if files is None:
        return cfg
    if isinstance(files, str):
        kw["data_files"] = _local_path(files, base)
    elif isinstance(files, list):
        kw["data_files"] = [_local_path(f, base) for f in files]
    elif isinstance(files, dict):
        kw["data_files"] = {s: ([_local_path(f, base) for f in v] if isinstance(v, list) else _local_path(v, base))
                            for s, v in files.items()}
    return {**cfg, "dataset_kwargs": kw}


def _is_local(path: Path | None) -> bool:
    return path is not None and _BUILTIN_DIR not in Path(path).resolve().parents


def _split_specs(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str | Path]]]:
    """The folders lm-eval must index, and each spec as ("name", str) / ("file", path) / ("dir", path)."""
    include: list[Path] = []
    parsed: list[tuple[str, str | Path]] = []
    for s in specs:
        p = Path(s).expanduser()
        if p.is_dir():
            include.append(p.resolve())
            parsed.append(("dir", p.resolve()))
        elif p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise TaskError(f"task file {p} does not exist")
            include.append(p.resolve().parent)  # a group YAML names tasks defined beside it
            parsed.append(("file", p.resolve()))
        else:
            parsed.append(("name", s))
    return list(dict.fromkeys(include)), parsed


def _yaml_stamp(folders: tuple[Path, ...]) -> tuple[tuple[str, int], ...]:
    return tuple((str(p), p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*.y*ml")))


@functools.lru_cache(maxsize=4)
def _cached_manager(include: tuple[Path, ...], defaults: bool, stamp: tuple) -> Any:  # noqa: ARG001 - stamp keys the cache
    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _task_manager(include: tuple[Path, ...], defaults: bool) -> Any:
    """lm-eval's index of the task YAML files, kept for the process: the built-in one costs
    seconds and its files do not change; the local folders' files are stamped (path, mtime)
    so an edited task is indexed again."""
    return _cached_manager(include, defaults, _yaml_stamp(include))


@dataclass
class TaskSuite:
    """Tasks loaded once (data included) to be run on several models.

    ``specs``: task names, YAML files or folders. ``num_fewshot`` overrides each task's own
    (except where a task fixes 0, as lm-eval does); ``limit`` keeps the first N items of each
    task (or a fraction when below 1).
    """

    specs: list[str]
    limit: int | float | None = None
    num_fewshot: int | None = None
    bootstrap_iters: int = 1000
    tasks: dict[str, Any] = field(default_factory=dict, repr=False)  # name -> lm-eval Task
    groups: dict[str, Any] = field(default_factory=dict, repr=False)
    group_map: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, specs: Sequence[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
             bootstrap_iters: int = 1000, quiet: bool | None = None) -> "TaskSuite":
        specs = [s.strip() for s in specs if s and s.strip()]
        if not specs:
            raise TaskError("no tasks given")
        if limit is not None and limit <= 0:
            raise TaskError(f"limit must be positive, got {limit}")
        suite = cls(list(specs), limit, num_fewshot, bootstrap_iters)
        with muted(quiet):
            suite._load()
        return suite

    def _load(self) -> None:
        include, parsed = _split_specs(self.specs)
        names = [str(s) for kind, s in parsed if kind == "name"]
        tm = _task_manager(tuple(include), False)
        if any(n not in tm.all_tasks for n in names):
            log.info("indexing lm-eval's built-in tasks")
            tm = _task_manager(tuple(include), True)
        for n in names:  # every name is checked before any data set loads
            if n not in tm.all_tasks:
                near = difflib.get_close_matches(n, tm.all_tasks, n=3, cutoff=0.75)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise TaskError(f"unknown task {n!r}: not an lm-eval task, group or tag, nor a YAML file or folder{hint}")
        for kind, s in parsed:
            for label, spec in self._expand(tm, kind, s):
                self._build(tm, label, spec)
        for task in self.tasks.values():
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)

    def _expand(self, tm: Any, kind: str, s: str | Path) -> list[tuple[str, str | dict[str, Any]]]:
        """(label for errors, what TaskManager.load takes) for one spec."""
        if kind == "dir":
            names = [n for n in tm.all_subtasks if (e := tm.task_index[n]).yaml_path is not None
                     and Path(s) in Path(e.yaml_path).resolve().parents]
            if not names:
                raise TaskError(f"no lm-eval task YAML in {s}")
            return [(n, self._local_config(Path(tm.task_index[n].yaml_path))) for n in names]
        if kind == "file":
            try:
                cfg = load_yaml(s, resolve_func=False)
            except Exception as e:  # noqa: BLE001 - yaml and lm-eval raise many kinds
                raise TaskError(f"{s}: not a readable task YAML ({type(e).__name__}: {e})") from e
            if "group" in cfg or "class" in cfg or "task" not in cfg:
                return [(str(s), str(s))]  # a group or a Python task: lm-eval's own resolution
            return [(cfg["task"], self._local_config(Path(s)))]
        name = str(s)
        e = tm.task_index[name]
        if name in tm.all_subtasks and _is_local(e.yaml_path) and "class" not in (e.cfg or {}):
            return [(name, self._local_config(Path(e.yaml_path)))]
        return [(name, name)]

    @staticmethod
    def _local_config(path: Path) -> dict[str, Any]:
        try:
            cfg = load_yaml(path, resolve_func=True)
        except Exception as e:  # noqa: BLE001
            raise TaskError(f"{path}: not a readable task YAML ({type(e).__name__}: {e})") from e
        return _with_local_data(cfg, path.parent)

    def _build(self, tm: Any, label: str, spec: str | dict[str, Any]) -> None:
        try:
            loaded = tm.load([spec])
        except Exception as e:  # noqa: BLE001 - data sets fail in many ways (offline, missing, gated)
            raise TaskError(_load_failure(label, spec, e)) from e
        for name in loaded["tasks"]:
            if name in self.tasks:
                raise TaskError(f"task {name} is asked for twice (directly or through a group)")
        self.tasks.update(loaded["tasks"])
        self.groups.update(loaded["groups"])
        self.group_map.update(loaded.get("group_map") or {})

    def run(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 8, seed: int = 0,
            quiet: bool | None = None) -> "RunResult":
        """Evaluate one model on every task. Deterministic: every seed is set again here."""
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        for task in self.tasks.values():
            task.set_fewshot_seed(seed=seed)
        task_dict = {"tasks": self.tasks, "groups": self.groups, "group_map": self.group_map}
        show = not quiet if quiet is not None else log.isEnabledFor(logging.INFO)
        with muted(not show):
            lm = _QuietLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            lm.show_progress = show
            with torch.inference_mode():
                out = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=self.limit,
                                         bootstrap_iters=self.bootstrap_iters, log_samples=True)
        return RunResult.from_lm_eval(out, self.tasks)


def _load_failure(label: str, spec: str | dict[str, Any], e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0][:300]
    what = spec.get("dataset_path") if isinstance(spec, dict) else None
    if isinstance(spec, str) and not Path(spec).exists():
        return (f"task {label}: its data could not be loaded ({type(e).__name__}: {msg}). Built-in lm-eval tasks download "
                "their data sets from the Hugging Face hub when they run: run where the hub is reachable (and "
                "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset), or with the data set already in the datasets cache")
    return f"task {label}: could not be loaded{f' from {what}' if what else ''} ({type(e).__name__}: {msg})"


# ----------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """One model's scores: ``metrics[task][key] = {"value", "stderr", "higher_is_better"}`` with
    ``key`` the metric name (``metric,filter`` where the filter is not lm-eval's ``none``);
    ``per_item[task][key]`` the per-item scores of mean-aggregated metrics, by doc id."""

    metrics: dict[str, dict[str, dict[str, Any]]]
    info: dict[str, dict[str, Any]]  # per task: n, num_fewshot, version, output_type, group
    per_item: dict[str, dict[str, dict[int, float]]]

    @classmethod
    def from_lm_eval(cls, out: dict[str, Any], tasks: dict[str, Any]) -> "RunResult":
        metrics: dict[str, dict[str, dict[str, Any]]] = {}
        info: dict[str, dict[str, Any]] = {}
        hib = out.get("higher_is_better", {})
        blocks = {**out.get("results", {}), **out.get("groups", {})}
        for name, block in blocks.items():
            m: dict[str, dict[str, Any]] = {}
            for k, v in block.items():
                if "," not in k or "_stderr," in k or not isinstance(v, (int, float)):
                    continue
                metric, filt = k.split(",", 1)
                se = block.get(f"{metric}_stderr,{filt}")
                m[metric if filt == "none" else k] = {
                    "value": float(v),
                    "stderr": float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None,
                    "higher_is_better": (hib.get(name) or {}).get(metric),
                }
            metrics[name] = m
            n = out.get("n-samples", {}).get(name, {})
            info[name] = {"n": n.get("effective") if isinstance(n, dict) else n,
                          "num_fewshot": out.get("n-shot", {}).get(name),
                          "version": out.get("versions", {}).get(name),
                          "output_type": tasks[name].get_config("output_type") if name in tasks else None,
                          "group": name not in tasks}
        per_item: dict[str, dict[str, dict[int, float]]] = {}
        for name, samples in (out.get("samples") or {}).items():
            means = {k for k, fn in tasks[name].aggregation().items() if fn is _lm_mean} if name in tasks else set()
            d: dict[str, dict[int, float]] = {}
            for s in samples:
                for metric in s.get("metrics", []):
                    if metric in means and isinstance(s.get(metric), (int, float, bool)):
                        key = metric if s["filter"] == "none" else f"{metric},{s['filter']}"
                        d.setdefault(key, {})[int(s["doc_id"])] = float(s[metric])
            per_item[name] = d
        return cls(metrics, info, per_item)


def paired_se(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Standard error of mean(a) − mean(b) over the same items: sd(aᵢ − bᵢ)/√n. Far smaller
    than the two stderrs combined when the models agree on most items, which is what a
    compressed copy and its original do; None when the items differ or n < 2."""
    if set(a) != set(b) or len(a) < 2:
        return None
    d = np.array([a[i] - b[i] for i in sorted(a)], dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d)))
