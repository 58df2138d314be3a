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

from visiontune.tasks.conformal import SetPrediction


@dataclass
class Decoded:
    """One image's prediction: the predicted label(s), their probability, and the ranked
    (label, probability) list."""

    labels: list[str]
    probs: list[float]
    ranked: list[tuple[str, float]] = field(default_factory=list)
    value: float | None = None  # regression: the predicted number
    scores: dict[str, float] = field(default_factory=dict, repr=False)  # every class's probability
    prediction_set: SetPrediction | None = None  # predict --coverage: the set (interval) with its guarantee
    abstained: bool = False  # predict --abstain, and the set holds more than one class: "not sure"
    ood_score: float | None = None  # how unlike the training images (higher: less alike); None: not scored
    unknown: bool = False  # the score is past the run's threshold: "none of my classes"


UNKNOWN = "unknown"  # the answer for an image unlike every training image ("none of my classes")
OOD_COLUMNS = ["unknown", "ood_score"]


def ood_record(decoded: Decoded) -> dict[str, Any]:
    """A JSON record's "unknown" and "ood_score" (none for a prediction that was not scored)."""
    return {} if decoded.ood_score is None else {"unknown": decoded.unknown, "ood_score": decoded.ood_score}


def ood_cells(decoded: Decoded) -> list[str]:
    return [] if decoded.ood_score is None else [str(decoded.unknown).lower(), f"{decoded.ood_score:.6g}"]


class Output:
    """Ranked classes: the top class, its probability and the runners-up."""

    def __init__(self, task: Any) -> None:
        self.task = task  # the tasks.base.Task whose predictions these are

    def line(self, path: str, decoded: Decoded) -> str:
        """The printed line: path, label ("not sure: a or b" when abstaining), probability,
        runners-up, and with --coverage the set; an unknown image: "unknown" and the top
        classes, the most probable first (its name is the prediction kept beside the flag)."""
        if decoded.unknown:
            top = ", ".join(f"{label} {prob:.3f}" for label, prob in decoded.ranked)
            return f"{path}\t{UNKNOWN}\t(top: {top})" + self.set_cell(decoded)
        others = ", ".join(f"{label} {prob:.3f}" for label, prob in decoded.ranked[1:])
        return (f"{path}\t{self.answer(decoded)}\t{decoded.probs[0]:.4f}" + (f"\t({others})" if others else "")
                + self.set_cell(decoded))

    def answer(self, decoded: Decoded) -> str:
        """The label, "unknown" (unlike every training image), or "not sure: a or b"
        (--abstain, a set of more than one class)."""
        if decoded.unknown:
            return UNKNOWN
        if decoded.abstained and decoded.prediction_set is not None:
            return f"not sure: {decoded.prediction_set.named()}"
        return decoded.labels[0]

    def set_cell(self, decoded: Decoded) -> str:
        """The printed line's last cells: with --coverage "90% set: a or b", and for an
        unknown image its score ("" for neither)."""
        s = decoded.prediction_set
        cells = "" if s is None else f"\t{s.percent} {'interval' if s.interval else 'set'}: {s.named()}"
        return cells + (f"\t(unlike the training images: score {decoded.ood_score:.3g})" if decoded.unknown else "")

    def record(self, decoded: Decoded) -> dict[str, Any]:
        """A prediction as JSON (predict --output x.json, serve)."""
        return {"labels": decoded.labels,
                "predictions": [{"label": label, "prob": prob} for label, prob in decoded.ranked],
                **self.set_record(decoded)}

    def set_record(self, decoded: Decoded) -> dict[str, Any]:
        """The set's fields of a JSON record: set, set_size, coverage, abstained (none
        without --coverage)."""
        s = decoded.prediction_set
        out = {} if s is None else {"set": s.labels, "set_size": len(s.labels), "coverage": s.coverage,
                                    "abstained": decoded.abstained}
        return {**out, **ood_record(decoded)}

    def csv_header(self, top_k: int, sets: bool = False, ood: bool = False) -> list[str]:
        """predict --output x.csv's columns (`sets`: with --coverage, the set's; `ood`: a run
        that scores how unlike its training images an image is: unknown, ood_score)."""
        k = max(1, min(top_k, self.task.num_outputs))
        return (["path", "label", "prob"] + [f"{c}{i + 1}" for i in range(1, k) for c in ("label", "prob")]
                + (self.set_columns() if sets else []) + (OOD_COLUMNS if ood else []))

    def set_columns(self) -> list[str]:
        return ["set", "set_size"]

    def set_cells(self, decoded: Decoded, delim: str) -> list[str]:
        s = decoded.prediction_set
        return ([] if s is None else [delim.join(s.labels), str(len(s.labels))]) + ood_cells(decoded)

    def csv_row(self, path: str, decoded: Decoded, delim: str, top_k: int) -> list[str]:
        """One prediction's cells under `csv_header`: the ranked classes as predicted (an
        unknown image keeps its top class in `label`, flagged in the `unknown` column, as in
        the JSON record; "not sure: a or b" when abstaining)."""
        label = self.answer(decoded) if decoded.abstained and not decoded.unknown else decoded.labels[0]
        return [path, label, f"{decoded.probs[0]:.6f}"] + [
            v for label, prob in decoded.ranked[1:] for v in (label, f"{prob:.6f}")] + self.set_cells(decoded, delim)

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
        if decoded.unknown:
            return f"{path}\t{UNKNOWN}\t(top: {top})" + self.set_cell(decoded)
        return (f"{path}\t{chosen}" if chosen else f"{path}\t(none)\t(top: {top})") + self.set_cell(decoded)

    def record(self, decoded: Decoded) -> dict[str, Any]:
        return {**super().record(decoded), "probs": decoded.scores}

    def csv_header(self, top_k: int, sets: bool = False, ood: bool = False) -> list[str]:
        return (["path", "labels", *[f"prob_{n}" for n in self.task.classes]] + (self.set_columns() if sets else [])
                + (OOD_COLUMNS if ood else []))

    def csv_row(self, path: str, decoded: Decoded, delim: str, top_k: int) -> list[str]:
        return [path, delim.join(decoded.labels), *[f"{decoded.scores[n]:.6f}" for n in self.task.classes],
                *self.set_cells(decoded, delim)]


class NumberOutput(Output):
    """One number per image."""

    def line(self, path: str, decoded: Decoded) -> str:
        return f"{path}\t{UNKNOWN + ' ' if decoded.unknown else ''}{decoded.value:.6g}" + self.set_cell(decoded)

    def record(self, decoded: Decoded) -> dict[str, Any]:
        return {"prediction": decoded.value, **self.set_record(decoded)}

    def set_record(self, decoded: Decoded) -> dict[str, Any]:
        s = decoded.prediction_set
        out = {} if s is None or s.interval is None else {"interval": list(s.interval), "interval_width": s.size,
                                                           "coverage": s.coverage}
        return {**out, **ood_record(decoded)}

    def csv_header(self, top_k: int, sets: bool = False, ood: bool = False) -> list[str]:
        return ["path", "prediction"] + (self.set_columns() if sets else []) + (OOD_COLUMNS if ood else [])

    def set_columns(self) -> list[str]:
        return ["low", "high"]

    def set_cells(self, decoded: Decoded, delim: str) -> list[str]:
        s = decoded.prediction_set
        interval = [] if s is None or s.interval is None else [f"{s.interval[0]:.9g}", f"{s.interval[1]:.9g}"]
        return interval + ood_cells(decoded)

    def csv_row(self, path: str, decoded: Decoded, delim: str, top_k: int) -> list[str]:
        # every digit of the float32 output (6 digits turned 1234567.8 into 1.23457e+06)
        return [path, f"{decoded.value:.9g}", *self.set_cells(decoded, delim)]

    def oof_columns(self) -> list[str]:
        return ["prediction"]

    def oof_cells(self, probs: np.ndarray, delim: str) -> list[str]:
        return [f"{float(probs[0]):.6g}", f"{float(probs[0]):.9g}"]  # the file keeps what a float32 holds
