"""Abilities scored by an lm-evaluation-harness task, on the model being trained, in memory.

An :class:`LMEvalTask` names a harness task (the ``lm_eval`` field of an
:class:`~hft_lightning.data.source.AbilitySource`). :func:`load_harness_task` resolves it in the harness's task
index, loads its data and picks its metric when the data module is built, so a misspelled task, data that cannot be
found offline or a metric the task does not report stops the run before training, naming the field. The
:class:`HarnessEvaluator` it returns scores a whole model at once: it wraps the module's model and tokenizer in the
harness's ``HFLM`` (under LoRA the peft model, adapters included) and runs ``lm_eval.simple_evaluate`` on the task
loaded before training, so the ability's score is the one ``simple_evaluate`` reports for the same model.

lm-eval is an optional dependency (``pip install 'hft_lightning[eval]'``), imported only when a harness ability is
declared. Indexing the harness's own tasks reads ~15 000 YAML files (7.5 s here), so each index is built once per
process, and a task found under ``include_path`` is resolved without it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hft_lightning.errors import ConfigError

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

INSTALL_HINT = "pip install 'hft_lightning[eval]'"


@dataclass(frozen=True)
class LMEvalTask:
    """An lm-evaluation-harness task whose primary metric is an ability's score.

    Attributes:
        task: The harness's task name (``gsm8k``, ``arc_easy``, ... ; ``lm-eval ls tasks`` lists them), a group
            with an aggregate score (``mmlu``: the mean of its tasks, weighted as the group's YAML says; lm-eval
            0.4.12 or later), or a task or group defined by a YAML file under ``include_path``. A tag, which has no
            aggregate score, is refused.
        include_path: A folder of the user's own task YAML files (the harness's ``--include_path``), relative to
            the working directory. A task whose ``dataset_path: json`` names local files runs offline.
        limit: Evaluate the first ``limit`` documents of the task's evaluation split, of each task of a group
            (``None``: all of them).
        num_fewshot: Few-shot examples per prompt (``None``: the task's own default).
        apply_chat_template: Render each prompt through the tokenizer's chat template, as every training example
            is (the harness's ``--apply_chat_template``).
        metric: The metric that becomes the ability's score, ``name`` or ``name,filter`` as the harness reports it
            (``exact_match,strict-match``); higher must be better. ``None``: the task's first metric under its
            first filter; a group's first aggregate metric.
        batch_size: Requests per forward pass.
    """

    task: str
    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = True
    metric: str | None = None
    batch_size: int = 16


class HarnessEvaluator:
    """Scores a model on one loaded harness task or group: its metric's value, as ``simple_evaluate`` reports it.

    Built by :func:`load_harness_task`. Calling it leaves the model's training mode and the global random states
    (``random``, numpy, torch) as it found them: ``simple_evaluate`` seeds all three, and training after an
    evaluation must not depend on it.

    Args:
        spec: The task as configured.
        task: The harness task or group, data loaded.
        metric: The key of its score in the task's or group's results (``exact_match,strict-match``).
        manager: The harness task index ``task`` was loaded from.
    """

    def __init__(self, spec: LMEvalTask, task: Task | Group, metric: str, manager: TaskManager):
        self.spec = spec
        self.task = task
        self.metric = metric
        self.manager = manager

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> float:
        """The metric's value for ``model`` (a transformers causal LM, or a peft model wrapping one)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        device = next(model.parameters()).device
        with _kept_training_mode(model), _kept_random_state(device), _quiet_harness():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.spec.batch_size)
            results = simple_evaluate(
                lm,
                tasks=[self.task],
                task_manager=self.manager,
                limit=self.spec.limit,
                num_fewshot=self.spec.num_fewshot,
                apply_chat_template=self.spec.apply_chat_template,
                log_samples=False,
            )
        return float(results["results"][self.spec.task][self.metric])


def load_harness_task(spec: LMEvalTask, field: str) -> HarnessEvaluator:
    """Resolves, loads and checks the task of ``spec``; the evaluator that scores a model on it.

    Args:
        spec: The task as configured.
        field: The config field holding ``spec`` (``data.abilities['gsm8k'].lm_eval``), named in errors.

    Raises:
        ConfigError: Naming the field, if lm-eval is not installed, a number is out of range, the task is unknown
            (with close matches from the harness's index), a tag or a group without an aggregate score, its data
            cannot be loaded, or the metric is not one the task reports or is not higher-is-better.
    """
    try:
        import lm_eval  # noqa: F401  (only to tell a missing install apart)
    except ImportError:
        raise ConfigError(f"{field}: lm-evaluation-harness is not installed; {INSTALL_HINT}") from None
    for name, value, least in (("limit", spec.limit, 1), ("num_fewshot", spec.num_fewshot, 0),
                               ("batch_size", spec.batch_size, 1)):  # fmt: skip
        if value is not None and value < least:
            raise ConfigError(f"{field}.{name} must be >= {least}, got {value}")
    include_path = None
    if spec.include_path is not None:
        include_path = Path(spec.include_path).resolve()
        if not include_path.is_dir():
            raise ConfigError(f"{field}.include_path: {spec.include_path} is not a folder")
    manager = _find_task(spec.task, None if include_path is None else str(include_path), field)
    group = spec.task in manager.all_groups
    try:
        if hasattr(manager, "load"):  # lm-eval 0.4.12 and later
            task = manager.load(spec.task)["groups" if group else "tasks"][spec.task]
        else:
            task = manager.load_task_or_group(spec.task)[spec.task]  # the loader of every lm-eval since 0.4.5
    except Exception as error:  # the datasets library raises many types for data it cannot find or read
        offline = " (HF_DATASETS_OFFLINE is set: its data must be local or cached)" if _offline() else ""
        raise ConfigError(f"{field}.task: cannot load the data of task {spec.task!r}{offline}: {error}") from None
    metric_key = _group_metric_key if group else _metric_key
    return HarnessEvaluator(spec, task, metric_key(spec.metric, task, f"{field}.metric"), manager)


def _find_task(name: str, include_path: str | None, field: str) -> TaskManager:
    """The task index holding the task or group ``name``: the ``include_path`` one alone if it has it."""
    if include_path is not None:
        local = _task_manager(include_path, include_defaults=False)
        if name in local.all_subtasks or name in local.all_groups:
            return _with_groups(local, name, field)
    manager = _task_manager(include_path, include_defaults=True)
    if name in manager.all_subtasks or name in manager.all_groups:
        return _with_groups(manager, name, field)
    if name in manager.all_tasks:
        raise ConfigError(
            f"{field}.task: {name!r} is a tag of tasks, which has no aggregate score; name a task or a group"
        )
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    where = "lm-eval's tasks" + (f" and {include_path}" if include_path else "")
    raise ConfigError(f"{field}.task: unknown task {name!r} in {where}{hint}")


def _with_groups(manager: TaskManager, name: str, field: str) -> TaskManager:
    """``manager``, checked to load ``name`` if it is a group: the loader of groups came with lm-eval 0.4.12."""
    if name in manager.all_groups and not hasattr(manager, "load"):
        raise ConfigError(f"{field}.task: {name!r} is a group of tasks, which needs lm-eval 0.4.12 or later")
    return manager


@functools.cache
def _task_manager(include_path: str | None, include_defaults: bool) -> TaskManager:
    from lm_eval.tasks import TaskManager

    with _quiet_harness():
        return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _metric_key(metric: str | None, task: Task, field: str) -> str:
    """The results key (``metric,filter``) of ``metric``, or of the task's first metric under its first filter."""
    higher_is_better = task.higher_is_better()
    filters = _filter_names(task)
    keys = [f"{m},{f}" for m in higher_is_better for f in filters]
    if metric is None:
        key = keys[0]
    else:
        key = metric if "," in metric else f"{metric},{filters[0]}"
        if key not in keys:
            raise ConfigError(f"{field}: task {task.config.task!r} reports no {metric!r}; it reports {', '.join(keys)}")
    if not higher_is_better[key.split(",")[0]]:
        raise ConfigError(f"{field}: {key!r} is lower-is-better; an ability's score must be higher-is-better")
    return key


def _group_metric_key(metric: str | None, group: Group, field: str) -> str:
    """The results key (``metric,filter``) of ``metric`` among the group's aggregates, or of its first aggregate.

    An aggregate without a ``filter_list`` covers every filter that a task reporting its metric applies, as the
    harness does when it aggregates.
    """
    tasks = group.get_all_tasks()
    if not group.has_aggregation:
        names = ", ".join(task.task_name for task in tasks)
        raise ConfigError(
            f"{field}: group {group.name!r} reports no aggregate score (its YAML has no aggregate_metric_list); "
            f"name one of its tasks: {names}"
        )
    keys, higher_is_better = [], {}
    for aggregate in group.aggregate_metric_list:
        reporting = [task for task in tasks if aggregate.metric in task.higher_is_better()]
        if not reporting:
            continue
        filters = {f for task in reporting for f in _filter_names(task)}
        keys += [f"{aggregate.metric},{name}" for name in aggregate.filter_list or sorted(filters)]
        higher_is_better[aggregate.metric] = all(task.higher_is_better()[aggregate.metric] for task in reporting)
    if not keys:
        metrics = ", ".join(aggregate.metric for aggregate in group.aggregate_metric_list)
        raise ConfigError(f"{field}: none of group {group.name!r}'s tasks reports its aggregate metrics ({metrics})")
    if metric is None:
        key = keys[0]
    else:
        key = metric if "," in metric else next((k for k in keys if k.split(",")[0] == metric), metric)
    if key not in keys:
        raise ConfigError(f"{field}: group {group.name!r} reports no {metric!r}; it reports {', '.join(keys)}")
    if not higher_is_better[key.split(",")[0]]:
        raise ConfigError(f"{field}: {key!r} is lower-is-better; an ability's score must be higher-is-better")
    return key


def _filter_names(task: Task) -> list[str]:
    """The names of the task's filters (``none`` when it has none), each a ``metric,filter`` key of its results."""
    return [f["name"] for f in task.config.filter_list or []] or ["none"]


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _kept_training_mode(model: nn.Module) -> Iterator[None]:
    training = model.training  # HFLM puts the model in eval mode and leaves it there
    try:
        yield
    finally:
        model.train(training)


@contextlib.contextmanager
def _kept_random_state(device: torch.device) -> Iterator[None]:
    python, numpy = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """Silences the harness's warnings about an in-memory model (expected here) and its per-task info."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
