"""Every task shape by name. Adding one = its class and a line here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from visiontune.errors import ConfigError
from visiontune.tasks.base import Task
from visiontune.tasks.multi_label import MultiLabel
from visiontune.tasks.single_label import SingleLabel

TASKS: dict[str, type[Task]] = {SingleLabel.name: SingleLabel, MultiLabel.name: MultiLabel}


def make_task(name: str, classes: Sequence[str], metadata: dict[str, Any] | None = None) -> Task:
    """The task called `name` over `classes`; `metadata` as `Task.metadata()` stored it."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not valid; choose one of: {', '.join(TASKS)}")
    return TASKS[name].from_metadata(classes, metadata or {})
