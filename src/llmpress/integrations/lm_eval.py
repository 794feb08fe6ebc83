"""lm-evaluation-harness as an engine: its tasks run on any model llmpress loads.

lm-eval takes a loaded model through ``HFLM(pretrained=module)``, so a QuantLinear or
LowRankLinear model runs as it is held in memory, with no export. What this module adds:

- **Local tasks that travel.** A task is a registered name (built in, or defined in a folder
  given on the list), a YAML file, or a folder (all the tasks its YAML files define). lm-eval
  resolves a local task's relative ``data_files`` against the working directory; here they are
  resolved against the YAML's own folder when they exist there, so a task folder works from
  anywhere, group members included. Built-in names cost lm-eval's index of its ~15 000 YAML files (seconds), so that
  index is built only when a name is not found among the local tasks, and once per process.
- **Tasks loaded once, run many times.** :class:`TaskSuite` loads the tasks (and their data)
  once; :meth:`TaskSuite.run` evaluates one model with every seed (Python, NumPy, torch, the
  few-shot sampler) set again before the run, so the original and a compressed copy see the
  same prompts, and a model run twice gives the same numbers.
- **Per-item scores kept** for metrics that are means over items, so two runs on the same
  items can be compared pairwise (:func:`llmpress.eval.tasks.paired_se`).
- **Quiet unless asked.** lm-eval logs warnings for a model object, draws progress bars and
  prints bootstrap notices to stdout; :func:`muted` silences all of it for the duration of a
  run unless logging is at INFO or below (``llmpress -v``).

lm-eval (the optional ``engines`` extra) is imported on first use, not with this module:
importing it costs seconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
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

from ..errors import InputError, ResourceLimitError

log = logging.getLogger(__name__)

__all__ = ["TaskError", "TaskSuite", "RunResult", "muted", "require"]


def require() -> Any:
    """lm-eval itself, or a clear ImportError (it is the optional ``engines`` extra). Every
    function here imports from lm-eval through this, so the module imports without it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ResourceLimitError(f"lm-evaluation-harness is not installed ({e}): pip install 'llmpress[engines]'") from e
    if not hasattr(TaskManager, "load"):  # pragma: no cover
        raise ResourceLimitError(f"lm-eval {getattr(lm_eval, '__version__', '?')} lacks TaskManager.load: this adapter is "
                          "written for lm-eval 0.4.13")
    return lm_eval


class TaskError(InputError):
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
    The model's own progress bars are turned off by :func:`_quiet_lm_class`'s model.
    """
    if enabled is None:
        enabled = not log.isEnabledFor(logging.INFO)
    if not enabled:
        yield
        return
    require()
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


@functools.lru_cache(maxsize=1)
def _quiet_lm_class() -> type:
    """HFLM whose request loops draw no progress bar when ``show_progress`` is off (lm-eval's
    evaluator never passes ``disable_tqdm``, and the rolling path forces it on). Defined on
    first use: the base class is lm-eval's."""
    require()
    from lm_eval.models.huggingface import HFLM

    class QuietLM(HFLM):
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

    return QuietLM


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


def _split_specs(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str | Path]]]:
    """The folders lm-eval must index, and each spec as ("name", str), ("task", YAML path),
    ("group", its name, from a YAML file) or ("dir", path)."""
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
            cfg = _read_yaml(p, resolve=False)
            if "group" in cfg or "class" in cfg or "task" not in cfg:
                # a group or a Python task, loaded by lm-eval by name (0.4.13 mistakes a group YAML's
                # task list for its name when loading it from a path) with the tasks beside it indexed
                include.append(p.resolve().parent)
                parsed.append(("group", cfg.get("group") or cfg.get("task") or str(p)))
            else:
                parsed.append(("task", p.resolve()))
        else:
            parsed.append(("name", s))
    return list(dict.fromkeys(include)), parsed


def _read_yaml(path: Path, resolve: bool) -> dict[str, Any]:
    require()
    # lm-eval's own YAML reader (``include:`` chains, ``!function`` tags); it has no public one
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=resolve)
    except Exception as e:  # noqa: BLE001 - yaml and lm-eval raise many kinds
        raise TaskError(f"{path}: not a readable task YAML ({type(e).__name__}: {e})") from e


def _local_config(path: Path) -> dict[str, Any]:
    """A local task's full config (includes merged, ``!function`` resolved), data files made absolute."""
    return _with_local_data(_read_yaml(path, resolve=True), path.parent)


@dataclass
class _Index:
    """lm-eval's TaskManager plus where each local task's YAML lives."""

    manager: Any
    folders: tuple[Path, ...]
    local: dict[str, Path]  # task name -> its YAML, for the tasks of the folders given

    def is_local(self, name: str) -> bool:
        """A task or group defined in one of the folders given (not one of lm-eval's)."""
        e = self.manager.task_index.get(name)
        p = e.yaml_path if e is not None else None
        return name in self.local or (p is not None and any(f in Path(p).resolve().parents for f in self.folders))


def _yaml_stamp(folders: tuple[Path, ...]) -> tuple[tuple[str, int], ...]:
    return tuple((str(p), p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*.y*ml")))


@functools.lru_cache(maxsize=4)
def _cached_index(include: tuple[Path, ...], defaults: bool, stamp: tuple) -> _Index:  # noqa: ARG001 - stamp keys the cache
    require()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=list(include) or None, include_defaults=defaults)
    local: dict[str, Path] = {}
    for name in tm.all_subtasks:
        e = tm.task_index[name]
        path = Path(e.yaml_path).resolve() if e.yaml_path is not None else None
        if path is None or not any(f in path.parents for f in include):
            continue
        local[name] = path
        if "class" in (e.cfg or {}):
            continue
        # lm-eval builds a task (directly or as a group member) from the YAML when its entry names
        # one, else from the entry's config: give it the config with the data files made absolute
        try:
            tm.task_index[name] = dataclasses.replace(e, yaml_path=None, cfg=_local_config(path))
        except TaskError as err:  # left as it is: lm-eval reports it if the task is asked for
            log.debug("%s", err)
    return _Index(tm, include, local)


def _task_index(include: tuple[Path, ...], defaults: bool) -> _Index:
    """lm-eval's index of the task YAML files, kept for the process: the built-in one costs
    seconds and its files do not change; the local folders' files are stamped (path, mtime)
    so an edited task is indexed again."""
    return _cached_index(include, defaults, _yaml_stamp(include))


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
        names = [str(x) for kind, x in parsed if kind == "name"]
        idx = _task_index(tuple(include), False)
        if any(n not in idx.manager.all_tasks for n in names):
            log.info("indexing lm-eval's built-in tasks")
            idx = _task_index(tuple(include), True)
        for n in names:  # every name is checked before any data set loads
            if n not in idx.manager.all_tasks:
                near = difflib.get_close_matches(n, idx.manager.all_tasks, n=3, cutoff=0.75)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise TaskError(f"unknown task {n!r}: not an lm-eval task, group or tag, nor a YAML file or folder{hint}")
        for kind, x in parsed:
            if kind == "dir":
                specs: list[str | dict[str, Any]] = [n for n, p in idx.local.items() if x in p.parents]
                if not specs:
                    raise TaskError(f"no lm-eval task YAML in {x}")
            else:  # a task YAML given alone is not indexed (its folder may hold anything): its config goes as is
                specs = [_local_config(Path(x))] if kind == "task" else [str(x)]
            for spec in specs:
                self._build(idx, spec)
        for task in self.tasks.values():
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)

    def _build(self, idx: _Index, spec: str | dict[str, Any]) -> None:
        label = spec if isinstance(spec, str) else spec.get("task", "?")
        try:
            loaded = idx.manager.load([spec])
        except Exception as e:  # noqa: BLE001 - data sets fail in many ways (offline, missing, gated)
            builtin = isinstance(spec, str) and not idx.is_local(spec)
            raise TaskError(_load_failure(label, e, builtin)) from e
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
        from lm_eval import evaluator

        task_dict = {"tasks": self.tasks, "groups": self.groups, "group_map": self.group_map}
        show = not quiet if quiet is not None else log.isEnabledFor(logging.INFO)
        with muted(not show):
            lm = _quiet_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            lm.show_progress = show
            with torch.inference_mode():
                out = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=self.limit,
                                         bootstrap_iters=self.bootstrap_iters, log_samples=True)
        return RunResult.from_lm_eval(out, self.tasks)


def _load_failure(label: str, e: BaseException, builtin: bool) -> str:
    msg = (str(e).strip().splitlines() or [""])[0][:300]
    if builtin:
        return (f"task {label}: its data could not be loaded ({type(e).__name__}: {msg}). Built-in lm-eval tasks download "
                "their data sets from the Hugging Face hub when they run: run where the hub is reachable (and "
                "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset), or with the data set already in the datasets cache")
    return f"task {label}: could not be loaded ({type(e).__name__}: {msg})"


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
        from lm_eval.api.metrics import mean as lm_mean

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
            means = {k for k, fn in tasks[name].aggregation().items() if fn is lm_mean} if name in tasks else set()
            d: dict[str, dict[int, float]] = {}
            for s in samples:
                for metric in s.get("metrics", []):
                    if metric in means and isinstance(s.get(metric), (int, float)):
                        key = metric if s["filter"] == "none" else f"{metric},{s['filter']}"
                        d.setdefault(key, {})[int(s["doc_id"])] = float(s[metric])
            per_item[name] = d
        return cls(metrics, info, per_item)
