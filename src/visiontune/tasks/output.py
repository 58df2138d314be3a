"""How a task's predictions are written: the printed line, predict's CSV columns and JSON
record (the CLI, `api.Prediction` and serve alike) and cv's out-of-fold cells. One class
per output shape, reached as `task.output`; a new task shape takes one of these as it is
(`Task.output_type`) or subclasses it. `Decoded` is the one prediction record they write.

- `Output`: ranked classes (single-label; the default).
- `LabelSetOutput`: the labels above their thresholds and every label's probability.
- `NumberOutput`: one number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Decoded:
    """One image's prediction: the predicted label(s), their probability, and the ranked
    (label, probability) list."""

    labels: list[str]
    probs: list[float]
    ranked: list[tuple[str, float]] = field(default_factory=list)
    value: float | None = None  # regression: the predicted number
    scores: dict[str, float] = field(default_factory=dict, repr=False)  # every class's probability


class Output:
    """Ranked classes: the top class, its probability and the runners-up."""

    def __init__(self, task: Any) -> None:
        self.task = task  # the tasks.base.Task whose predictions these are

    def line(self, path: str, decoded: Decoded) -> str:
        """The printed line: path, label, probability, runners-up."""
        others = ", ".join(f"{label} {prob:.3f}" for label, prob in decoded.ranked[1:])
        return f"{path}\t{decoded.labels[0]}\t{decoded.probs[0]:.4f}" + (f"\t({others})" if others else "")

    def record(self, decoded: Decoded) -> dict[str, Any]:
        """A prediction as JSON (predict --output x.json, serve)."""
        return {"labels": decoded.labels,
                "predictions": [{"label": label, "prob": prob} for label, prob in decoded.ranked]}

    def csv_header(self, top_k: int) -> list[str]:
        """predict --output x.csv's columns."""
        k = max(1, min(top_k, self.task.num_outputs))
        return ["path", "label", "prob"] + [f"{c}{i + 1}" for i in range(1, k) for c in ("label", "prob")]

    def csv_row(self, path: str, decoded: Decoded, delim: str, top_k: int) -> list[str]:
        """One prediction's cells under `csv_header`."""
        return [path, decoded.labels[0], f"{decoded.probs[0]:.6f}"] + [
            v for label, prob in decoded.ranked[1:] for v in (label, f"{prob:.6f}")]

    def oof_columns(self) -> list[str]:
        """The columns of cv's oof.csv holding the out-of-fold outputs, one per output."""
        return [f"prob_{c}" for c in self.task.classes]

    def oof_cells(self, probs: np.ndarray, delim: str) -> list[str]:
        """One oof.csv row's "predicted" cell (as decoded: the class, the label set) and
        its output cells (`oof_columns`)."""
        return [delim.join(self.task.decode(probs[None, :], 1)[0].labels), *[f"{v:.6f}" for v in probs]]


class LabelSetOutput(Output):
    """A label set: the labels above their thresholds, and every label's probability."""

    def line(self, path: str, decoded: Decoded) -> str:
        """Every label above its threshold with its probability, or "(none)" and the top ones."""
        chosen = ", ".join(f"{label} {prob:.3f}" for label, prob in zip(decoded.labels, decoded.probs))
        top = ", ".join(f"{label} {prob:.3f}" for label, prob in decoded.ranked)
        return f"{path}\t{chosen}" if chosen else f"{path}\t(none)\t(top: {top})"

    def record(self, decoded: Decoded) -> dict[str, Any]:
        return {**super().record(decoded), "probs": decoded.scores}

    def csv_header(self, top_k: int) -> list[str]:
        return ["path", "labels", *[f"prob_{n}" for n in self.task.classes]]

    def csv_row(self, path: str, decoded: Decoded, delim: str, top_k: int) -> list[str]:
        return [path, delim.join(decoded.labels), *[f"{decoded.scores[n]:.6f}" for n in self.task.classes]]


class NumberOutput(Output):
    """One number per image."""

    def line(self, path: str, decoded: Decoded) -> str:
        return f"{path}\t{decoded.value:.6g}"

    def record(self, decoded: Decoded) -> dict[str, Any]:
        return {"prediction": decoded.value}

    def csv_header(self, top_k: int) -> list[str]:
        return ["path", "prediction"]

    def csv_row(self, path: str, decoded: Decoded, delim: str, top_k: int) -> list[str]:
        return [path, f"{decoded.value:.9g}"]  # every digit of the float32 output (6 digits turned 1234567.8 into 1.23457e+06)

    def oof_columns(self) -> list[str]:
        return ["prediction"]

    def oof_cells(self, probs: np.ndarray, delim: str) -> list[str]:
        return [f"{float(probs[0]):.6g}", f"{float(probs[0]):.9g}"]  # the file keeps what a float32 holds
