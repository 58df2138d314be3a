"""The `advise` command: which strategy fits this data, measured here and explained with
the numbers. The measurement and the rule are planning's (planning/advice.py), the same
that resolve `--strategy auto` and plan a time budget; this is their report."""

from __future__ import annotations

import os
from typing import Any

from visiontune.config import RunConfig
from visiontune.data.items import LabelFunc
from visiontune.data.sources import resolve_inputs
from visiontune.planning.advice import Advice, advise_source
from visiontune.planning.costs import measure_costs

__all__ = ["Advice", "advise"]


def advise(data: str | os.PathLike[str] | None = None, *, config: RunConfig | None = None,
           label_func: LabelFunc | None = None, **overrides: Any) -> Advice:
    """Measure the data, the task similarity and the costs here; recommend a strategy."""
    RunConfig.create(config, **overrides).refuse_time_budget("advise", "measures the data and recommends a strategy")
    cfg, source = resolve_inputs(data, config, label_func, overrides)
    return advise_source(cfg, source, measure_costs(cfg, source))
