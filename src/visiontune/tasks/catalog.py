"""Every task shape by name, its help line and where its class is (imported when a task is
made: the list itself needs no torch, so --task's choices come from it). Adding one = its
class and a line here (or, from outside the package, `register_task(cls)`: then --task,
the data side and every command know it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from visiontune.registry import Registry
from visiontune.tasks.labels import MULTI, REGRESSION, SINGLE

TASKS: Registry[Any] = Registry("task")  # name -> the Task subclass (tasks/base.py)
TASKS.lazy(SINGLE, "visiontune.tasks.single_label:SingleLabel",
           "one class per image: softmax + cross-entropy; accuracy, macro-F1")
TASKS.lazy(MULTI, "visiontune.tasks.multi_label:MultiLabel",
           "a set of labels per image (maybe empty): sigmoid + binary cross-entropy; mAP, F1")
TASKS.lazy(REGRESSION, "visiontune.tasks.regression:Regression",
           "a number per image: linear output, MSE (or Huber) on standardised targets; MAE, RMSE, R², rho")


def task_choices() -> tuple[str, ...]:
    """What --task offers: auto and every registered task (no torch needed for --help)."""
    return ("auto", *TASKS)


def register_task(cls: Any, help: str = "") -> Any:
    """Make the Task subclass `cls` a task choice (usable as a class decorator); returns it.
    `help`: its line in --help (default: the class's `description`, else its docstring)."""
    text = help or getattr(cls, "description", "") or (cls.__doc__ or "").strip().split("\n")[0]
    return TASKS.add(cls.name, cls, text)


def task_class(name: str) -> Any:
    """The Task subclass called `name` (ConfigError naming the choices otherwise)."""
    return TASKS.find(name)


def make_task(name: str, classes: Sequence[str], metadata: dict[str, Any] | None = None) -> Any:
    """The task (a `tasks.base.Task`) called `name` over `classes`; `metadata` as
    `Task.metadata()` stored it."""
    return task_class(name).from_metadata(classes, metadata or {})
