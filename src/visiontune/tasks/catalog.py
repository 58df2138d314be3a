"""Every task shape by name. Adding one = its class and a line here (or, from outside the
package, `register_task(cls)`: then --task, the data side and every command know it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from visiontune.data.labels import TASK_NAMES
from visiontune.registry import Registry
from visiontune.tasks.base import Task
from visiontune.tasks.multi_label import MultiLabel
from visiontune.tasks.regression import Regression
from visiontune.tasks.single_label import SingleLabel

TASKS: Registry[type[Task]] = Registry("task", {t.name: t for t in (SingleLabel, MultiLabel, Regression)})


def register_task(cls: type[Task]) -> type[Task]:
    """Make `cls` a task choice (usable as a class decorator); returns it."""
    if cls.name not in TASK_NAMES:
        TASK_NAMES.append(cls.name)
    return TASKS.add(cls.name, cls)


def task_class(name: str) -> type[Task]:
    """The Task subclass called `name` (ConfigError naming the choices otherwise)."""
    return TASKS.find(name)


def make_task(name: str, classes: Sequence[str], metadata: dict[str, Any] | None = None) -> Task:
    """The task called `name` over `classes`; `metadata` as `Task.metadata()` stored it."""
    return task_class(name).from_metadata(classes, metadata or {})
