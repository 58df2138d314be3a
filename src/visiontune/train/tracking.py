"""Experiment tracking: TensorBoard, MLflow and Weights & Biases, with the real packages
(`--track`).

    visiontune train DATA --track tensorboard,mlflow,wandb

- **TensorBoard** (`torch.utils.tensorboard`): event files in `RUN/tensorboard/`: every
  loss and metric per epoch (step = epoch), the learning rate of every optimizer group
  per step (`lr/<group>`), the confusion matrix and the curves as images at the end, and
  the hyper-parameters with the final metrics (the HPARAMS tab). `tensorboard --logdir runs`.
- **MLflow** (`MlflowClient`, no global active run): `MLFLOW_TRACKING_URI` when set, else
  a SQLite store beside the runs, `sqlite:///RUNS/mlflow.db` (RUNS: the `--output` folder;
  the store MLflow 3 recommends for local use, in place of the deprecated `./mlruns` file
  store); a SQLite store's artifacts go to `mlartifacts/` beside its database; experiment `$MLFLOW_EXPERIMENT_NAME` or "visiontune". A run
  named like the run directory, every config field as a param (`train.lr`...), metrics
  per epoch (step = epoch), tags (backbone, strategy, task, run_dir), and the artifacts
  model.safetensors, config.yaml, metrics.json (report.html when `interpret` runs later:
  the MLflow run id is kept in `RUN/tracking.json`; `--resume` continues that MLflow run).
  `cv` and `compare` open a parent run with one child per fold / strategy.
- **Weights & Biases** (`wandb.init`, its files in `RUN/wandb/`): project `$WANDB_PROJECT`
  or "visiontune", the run named like the run directory, the config (nested as in
  config.yaml), tags (backbone, strategy, task), per-epoch metrics against `epoch`, the
  final metrics in the summary, the curves and confusion matrix (residuals for numbers)
  as images. `cv` and
  `compare` runs share a group named after their folder. `--resume` continues the same
  W&B run (its id is in `RUN/tracking.json`). The model is logged as an artifact only when
  `$WANDB_LOG_MODEL` is `end` or `true` (the Hugging Face Trainer's convention). W&B's own
  settings apply: `WANDB_MODE=offline` logs locally for `wandb sync` later.

A backend that fails mid-run (an unwritable store, a server gone) is reported once as a
warning and switched off; training and the run directory are untouched. A backend whose
package is missing is a ConfigError with the install line, before training starts.
Only rank 0 tracks under torchrun.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.config import TRACKERS, parse_track
from visiontune.errors import ConfigError
from visiontune.rundir import RunDir
from visiontune.train.callbacks import Callback, TrainerView, metrics_of

log = logging.getLogger(__name__)

INSTALL = "pip install 'visiontune[track]'"
# the folder of a cv / compare whose runs are grouped (W&B's group)
_group: contextvars.ContextVar[str | None] = contextvars.ContextVar("visiontune_track_group", default=None)
# the MLflow parent run (cv, compare) the runs trained inside belong to: (run id, store URI)
_parent: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("visiontune_mlflow_parent",
                                                                                default=None)


def flat_params(cfg: Any) -> dict[str, str]:
    """Every config field as 'section.name' -> text."""
    out: dict[str, str] = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": str(v) for k, v in value.items()})
        else:
            out[key] = str(value)
    return out


def _require(name: str) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None:
        install = "pip install 'visiontune[wandb]'" if name == "wandb" else INSTALL
        raise ConfigError(f"--track {name} needs the {module} package: {install}")


# -- MLflow -------------------------------------------------------------------------------
def default_store(runs: Path) -> str:
    """The store used when $MLFLOW_TRACKING_URI is not set: SQLite in the runs folder."""
    return "sqlite:///" + str(Path(runs).resolve() / "mlflow.db")


def store_uri(runs: Path) -> str:
    """$MLFLOW_TRACKING_URI, else the parent run's store, else `default_store(runs)`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (parent[1] if (parent := _parent.get()) else "") \
        or default_store(runs)


def mlflow_client(runs: Path) -> tuple[Any, str]:
    """(MlflowClient, experiment id) in `store_uri(runs)`. An experiment created in a SQLite
    store keeps its artifacts in `mlartifacts/` beside the database (RUNS/mlartifacts for
    the default store), not in MLflow's ./mlruns of the current folder."""
    from mlflow.tracking import MlflowClient

    uri, artifacts = store_uri(runs), None
    if uri == default_store(runs):
        Path(runs).mkdir(parents=True, exist_ok=True)
    if uri.startswith("sqlite:///"):  # a local database: its artifacts beside it (MLflow's default is ./mlruns)
        artifacts = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store the user named: MLflow 3 asks this
    client = MlflowClient(tracking_uri=uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "visiontune")
    found = client.get_experiment_by_name(name)
    return client, found.experiment_id if found else client.create_experiment(name, artifacts)


@contextlib.contextmanager
def parent_run(track: str, runs: Path, name: str, tags: dict[str, str], params: dict[str, str] | None = None
               ) -> Iterator[ParentRun]:
    """An MLflow parent run (cv, compare) whose id the runs trained inside take as
    `mlflow.parentRunId`, in the same store; a no-op unless `track` names mlflow. `runs`:
    the folder whose mlflow.db is the default store."""
    parent = ParentRun(track, runs, name, tags, params or {})
    token = _parent.set((parent.run_id, parent.client.tracking_uri) if parent.run_id is not None
                        else _parent.get())
    group = _group.set(_group.get() or name)  # compare --folds: the folds join the compare's group
    try:
        yield parent
    except BaseException:
        parent.end("FAILED")
        raise
    finally:
        _parent.reset(token)
        _group.reset(group)
    parent.end("FINISHED")


class ParentRun:
    def __init__(self, track: str, runs: Path, name: str, tags: dict[str, str], params: dict[str, str]) -> None:
        self.run_id: str | None = None
        self.client: Any = None
        if "mlflow" not in parse_track(track):
            return
        _require("mlflow")
        try:
            self.client, experiment = mlflow_client(runs)
            if (outer := _parent.get()) is not None:  # compare --folds: a cv inside a compare
                tags = {**tags, "mlflow.parentRunId": outer[0]}
            self.run_id = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
            _log_params(self.client, self.run_id, params)
        except Exception as exc:  # noqa: BLE001 - tracking never stops the work
            log.warning("mlflow: parent run not created (%s); the runs are tracked without it", redact(exc))
            self.run_id = None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self.run_id is None:
            return
        try:
            _log_metrics(self.client, self.run_id, metrics, step=0)
        except Exception as exc:  # noqa: BLE001
            log.warning("mlflow: parent run metrics not logged (%s)", redact(exc))

    def end(self, status: str) -> None:
        if self.run_id is not None:
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.run_id, status)
            self.run_id = None


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int) -> None:
    """The finite values of `metrics` at `step`, in one batch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)])


SECRET_QUERY_KEYS = re.compile(r"(?i)(pass(word)?|pwd|token|secret|key|sig(nature)?|credential|auth)")


def redact(text: Any) -> str:
    """`text` (a URI, or a message quoting one) without credentials: the user:password@ of
    every URL and the values of password/token/secret/key... query parameters become ***.
    Tracking URIs are redacted wherever visiontune writes or prints them."""
    text = re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", r"\1***@", str(text))

    def query(match: re.Match[str]) -> str:
        key = match.group(2)
        return f"{match.group(1)}{key}=***" if SECRET_QUERY_KEYS.search(key) else match.group(0)

    return re.sub(r"([?&;])([^=&;\s#]+)=([^&;\s#]*)", query, text)


def _store_uri(recorded: str) -> str:
    """The store a tracking.json names. It is recorded without credentials: the store's URI
    with them is $MLFLOW_TRACKING_URI when that is the same store."""
    current = os.environ.get("MLFLOW_TRACKING_URI", "")
    if current and redact(current) == recorded:
        return current
    if "***" in recorded:
        raise ValueError(f"tracking.json names the store {recorded}; set MLFLOW_TRACKING_URI to it (with its "
                         "credentials, which are not kept in the run directory)")
    return recorded


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


# -- the callbacks ------------------------------------------------------------------------
class Tracker(Callback):
    """A backend behind the callback events; any exception switches it off with one warning."""

    name = "tracker"

    def __init__(self, run_dir: Path, cfg: Any, task: Any) -> None:
        self.run_dir, self.cfg, self.task, self.alive = Path(run_dir), cfg, task, True

    def _safely(self, what: str, fn: Any, *args: Any) -> None:
        if not self.alive:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking never stops training
            self.alive = False
            log.warning("%s tracking failed while %s (%s%s: %s); training goes on without it, the run directory "
                        "has everything", self.name, what, self.where(), type(exc).__name__, redact(exc))

    def on_fit_start(self, trainer: TrainerView) -> None:
        self._safely("starting", self.start, trainer)

    def on_step_end(self, trainer: TrainerView) -> None:
        self._safely("logging a step", self.step, trainer)

    def on_epoch_end(self, trainer: TrainerView) -> None:
        self._safely("logging an epoch", self.epoch, trainer.state.history[-1])

    def finish(self, result: Any, valid_outputs: Any) -> None:
        """After the run is summarised (final metrics, files written); `valid_outputs`: the
        validation outputs of the weights the run ends with (or None)."""
        self._safely("finishing", self.end, result, valid_outputs)

    def fail(self) -> None:
        self._safely("closing a failed run", self.abort)

    def where(self) -> str:
        """Where the backend writes, for its warnings ('store URI: ')."""
        return ""

    def start(self, trainer: TrainerView) -> None: ...
    def step(self, trainer: TrainerView) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def end(self, result: Any, valid_outputs: Any) -> None: ...
    def abort(self) -> None: ...




def run_figures(result: Any, valid_outputs: Any, task: Any) -> dict[str, Any]:
    """The figures a tracker logs at the end: the training curves, and the validation
    outputs' confusion matrix (residuals for a task without classes to confuse)."""
    from visiontune.plots import confusion_figure, curves_figure, residuals_figure

    figures = {"curves": curves_figure(result.history)} if result.history else {}
    if valid_outputs is not None and len(valid_outputs.targets):
        report = task.report(valid_outputs.targets, valid_outputs.probs)
        if report.confusion is None:  # regression: its residuals
            figures["residuals"] = residuals_figure(valid_outputs.targets, valid_outputs.probs, task.classes[0])
        else:
            figures["confusion"] = confusion_figure(report.confusion, task.classes,
                                                    list(report.columns) if report.columns else None)
    return figures


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, trainer: TrainerView) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(RunDir(self.run_dir).tensorboard))
        self.writer.add_text("config", "```\n" + json.dumps(self.cfg.to_dict(), indent=1, default=str) + "\n```")

    def step(self, trainer: TrainerView) -> None:
        for i, group in enumerate(trainer.optimizer.param_groups):
            self.writer.add_scalar(f"lr/{group.get('name', i)}", group["lr"], trainer.state.global_step)

    def epoch(self, row: dict[str, Any]) -> None:
        for key, value in metrics_of(row, keep_train_loss=True).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.add_scalar("seconds", row["seconds"], row["epoch"])
        self.writer.flush()

    def end(self, result: Any, valid_outputs: Any) -> None:
        for name, figure in run_figures(result, valid_outputs, self.task).items():
            self.writer.add_figure(name, figure, len(result.history))
        finals = {f"final/{k}": float(v) for k, v in result.metrics.items() if np.isfinite(v)}
        self.writer.add_hparams(flat_params(self.cfg), finals or {"final/none": 0.0}, run_name="hparams")
        self.writer.close()

    def abort(self) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


class MlflowTracker(Tracker):
    name = "mlflow"

    def where(self) -> str:
        return f"store {redact(store_uri(self.run_dir.parent))}: "

    def start(self, trainer: TrainerView) -> None:
        self.client, experiment = mlflow_client(self.run_dir.parent)
        if (previous := self._previous_run()) is not None:  # --resume: the same MLflow run goes on
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            return
        m = self.cfg.model
        tags = {"backbone": m.backbone, "strategy": self.cfg.strategy.name, "task": self.task.name,
                "run_dir": str(self.run_dir), "weights": m.weights}
        if (parent := _parent.get()) is not None:
            tags["mlflow.parentRunId"] = parent[0]
        self.run_id = self.client.create_run(experiment, run_name=self.run_dir.name, tags=tags).info.run_id
        _log_params(self.client, self.run_id, flat_params(self.cfg))
        RunDir(self.run_dir).record_tracking("mlflow",  # no credentials in a file that gets shared
                    {"run_id": self.run_id, "tracking_uri": redact(self.client.tracking_uri)})

    def _previous_run(self) -> str | None:
        """The MLflow run this run directory was tracked in before (a resumed run), if any
        and if it is in the same store."""
        entry = RunDir(self.run_dir).tracked("mlflow")
        if entry is None or entry.get("tracking_uri") != redact(self.client.tracking_uri):
            return None
        return str(entry["run_id"])

    def epoch(self, row: dict[str, Any]) -> None:
        values = {**metrics_of(row, keep_train_loss=True), "lr": row["lr"], "epoch_seconds": row["seconds"]}
        _log_metrics(self.client, self.run_id, values, step=int(row["epoch"]))

    def end(self, result: Any, valid_outputs: Any) -> None:
        _log_metrics(self.client, self.run_id, {f"final_{k}": v for k, v in result.metrics.items()}, step=0)
        for path in RunDir(self.run_dir).tracked_files():
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def abort(self) -> None:
        if hasattr(self, "run_id"):
            self.client.set_terminated(self.run_id, "FAILED")


class WandbTracker(Tracker):
    name = "wandb"

    def where(self) -> str:
        return "W&B: run `wandb login`, or set WANDB_MODE=offline and `wandb sync` the run later; "

    def start(self, trainer: TrainerView) -> None:
        import wandb

        m = self.cfg.model
        previous = RunDir(self.run_dir).tracked("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "visiontune"), dir=str(self.run_dir), name=self.run_dir.name,
            config=self.cfg.to_dict(), tags=[m.backbone, self.cfg.strategy.name, self.task.name],
            group=_group.get(), id=previous["run_id"] if previous else None, resume="allow" if previous else None,
            settings=wandb.Settings(console="off", init_timeout=60, quiet=True))
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        RunDir(self.run_dir).record_tracking("wandb", {"run_id": self.run.id, "project": self.run.project})

    def epoch(self, row: dict[str, Any]) -> None:
        self.run.log({**metrics_of(row, keep_train_loss=True), "lr": row["lr"], "epoch_seconds": row["seconds"],
                      "epoch": int(row["epoch"])})

    def end(self, result: Any, valid_outputs: Any) -> None:
        try:
            self._end(result, valid_outputs)
        finally:
            self.run.finish()

    def _end(self, result: Any, valid_outputs: Any) -> None:
        import wandb

        self.run.summary.update({f"final_{k}": float(v) for k, v in result.metrics.items() if np.isfinite(v)})
        figures = run_figures(result, valid_outputs, self.task)
        if figures:
            self.run.log({name: wandb.Image(_image(figure)) for name, figure in figures.items()})
        if os.environ.get("WANDB_LOG_MODEL", "false").lower() in ("end", "true", "1"):
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
            for path in RunDir(self.run_dir).tracked_files():
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def abort(self) -> None:
        if hasattr(self, "run"):
            self.run.finish(exit_code=1)


def _image(figure: Any) -> Any:
    """A matplotlib figure (plots.py's, not pyplot's) as a PIL image."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def make_trackers(track: str, run_dir: Path, cfg: Any, task: Any) -> list[Tracker]:
    """The trackers `track` names (packages checked first: a ConfigError names the install)."""
    names = parse_track(track).split(",") if track else []
    for name in names:
        _require(name)
    return [TRACKERS.find(n)(run_dir, cfg, task) for n in names if n]  # config.TRACKERS: name -> class here


def log_artifact_to_run(run_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Attach a file made after training (interpret's report.html) to the run's MLflow run,
    if it was tracked; a failure is a warning."""
    run = RunDir(run_dir)
    if not run.tracking_file.is_file():
        return
    entry = run.tracked("mlflow")
    try:
        if entry is None:
            raise ValueError("tracking.json names no MLflow run")
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        MlflowClient(tracking_uri=_store_uri(entry["tracking_uri"])).log_artifact(entry["run_id"], str(path))
    except Exception as exc:  # noqa: BLE001
        log.warning("mlflow: %s not attached to the run (%s)", path, redact(exc))
