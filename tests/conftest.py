"""Shared fixtures: tiny generated image folders and a tiny model configuration."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.train.callbacks import Callback, StopTraining

os.environ.setdefault("VISIONTUNE_OFFLINE", "1")  # tests never touch the network
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: each worker (and what it starts) computes on one thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# A timm test architecture at 32 px: each training step takes milliseconds.
TINY = dict(backbone="timm:test_efficientnet", weights="none", image_size=32, batch_size=8,
            num_workers=0, progress=False, patience=0)


def make_image(path: Path, color: tuple[int, int, int], size: int = 40, seed: int = 0, mode: str = "RGB") -> Path:
    """A noisy image dominated by `color`, so classes are learnable."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.float64) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "grey": (128, 128, 128)}


def make_class_folders(root: Path, classes: dict[str, int], start_seed: int = 0) -> Path:
    """root/<class>/<class>_<i>.png with `classes[name]` images each."""
    seed = start_seed
    for name, count in classes.items():
        for i in range(count):
            make_image(root / name / f"{name}_{i:03d}.png", COLORS[name], seed=seed)
            seed += 1
    return root


@pytest.fixture
def flat_data(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "flat", {"red": 12, "green": 12})


@pytest.fixture
def split_data(tmp_path: Path) -> Path:
    root = tmp_path / "split"
    make_class_folders(root / "train", {"red": 10, "green": 10}, 0)
    make_class_folders(root / "valid", {"red": 4, "green": 4}, 100)
    make_class_folders(root / "test", {"red": 3, "green": 3}, 200)
    return root


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`, the tests that share a module-scoped fixture of their module
    (a run trained once for the module) go to one worker, which trains it once."""
    for item in items:
        module = item.nodeid.split("::")[0]
        defs = getattr(item, "_fixtureinfo", None)
        shared = defs is not None and any(d and d[-1].scope == "module" and d[-1].baseid == module
                                          for d in defs.name2fixturedefs.values())
        if shared and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The caches of a module's shared fixtures (a run trained once for the module) go to a
    folder of the module's own, never ~/.cache: autouse, so it is set before them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISIONTUNE_CACHE", str(tmp_path_factory.mktemp("module-cache")))
        yield


@pytest.fixture(autouse=True)
def _test_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's caches (features, probes, engines, decoded images, scans, datasets) go to
    a folder of its own: no test reads what another cached, whatever the order or worker.
    (The subprocesses a test starts inherit it.)"""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture
def without_statvfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The os module as on Windows: no os.statvfs, no os.posix_fallocate. shutil.disk_usage
    (which on Windows asks the system directly, on POSIX os.statvfs) keeps working."""
    statvfs = os.statvfs

    def disk_usage(path: str | os.PathLike[str]) -> shutil._ntuple_diskusage:  # Windows' shutil.disk_usage
        st = statvfs(path)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return shutil._ntuple_diskusage(total, total - st.f_bfree * st.f_frsize, free)

    for name in ("statvfs", "posix_fallocate"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def make_multilabel_data(root: Path, n: int = 48, seed: int = 0, with_split: bool = False) -> Path:
    """root/images/*.png on grey, each with a random subset of {red, green, blue} painted in
    its quadrants (sometimes none), and root/labels.csv with path,labels[,split]."""
    rng = np.random.default_rng(seed)
    names = ("red", "green", "blue")
    rows = [["path", "labels"] + (["split"] if with_split else [])]
    for i in range(n):
        present = [c for c in names if rng.random() < 0.45]
        arr = np.full((40, 40, 3), 128.0) + rng.normal(0, 10, (40, 40, 3))
        for q, c in enumerate(present):
            y0, x0 = (q // 2) * 20, (q % 2) * 20
            arr[y0:y0 + 20, x0:x0 + 20] = np.array(COLORS[c]) + rng.normal(0, 10, (20, 20, 3))
        path = root / "images" / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
        split = ["test" if i % 6 == 0 else "valid" if i % 6 == 1 else "train"] if with_split else []
        rows.append([f"images/{path.name}", " ".join(present)] + split)
    with open(root / "labels.csv", "w", newline="") as fh:
        import csv

        csv.writer(fh).writerows(rows)
    return root


def chromium() -> str:
    """The Chromium the browser tests drive: a failure in CI (.ci/run installs it), a skip elsewhere."""
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (.ci/run installs it)")
        pytest.skip("no chromium on this machine")
    return path


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


@contextlib.contextmanager
def page_with_answer(port: int, image: Path, shot_name: str, shots: Path):
    """Headless Chromium on the page served at `port`, `image` uploaded and its answer shown
    (tr.prediction); the page is yielded, then screenshotted to $VISIONTUNE_ARTIFACTS (or
    `shots`)/`shot_name`."""
    browser_path = chromium()
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("tr.prediction", timeout=20_000)
        yield page
        shot = Path(os.environ.get("VISIONTUNE_ARTIFACTS", shots)) / shot_name
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        browser.close()


def serve_in_thread(app):
    """uvicorn serving `app` on a free port in a thread: (port, server, thread)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return port, server, thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `visiontune` command serving a page in a process of its own (`python -m
    visiontune ... --port P`), its output in `log`; requests go to 127.0.0.1:P."""

    def __init__(self, args: list[str], log: Path, cwd: Path | None = None, timeout: float = 120) -> None:
        self.port, self.log = free_port(), log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p),
               "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "visiontune", *args, "--port", str(self.port)],
                                         cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(f"the server did not start: {self.output()}") from None
                time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text()

    def request(self, method: str, path: str, body: object = None, host: str | None = None,
                port: int | None = None, address: str = "127.0.0.1") -> tuple[int, object]:
        """(status, the JSON answer, else its text)."""
        conn = http.client.HTTPConnection(address, port or self.port, timeout=60)
        headers = {"Host": host} if host else {}
        data = None if body is None else json.dumps(body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        answer = conn.getresponse()
        text = answer.read().decode()
        try:
            return answer.status, json.loads(text)
        except ValueError:
            return answer.status, text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class StopAfter(Callback):
    """Stops a run after `n` epochs, as a crash would (the checkpoint of epoch n is on disk)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, trainer) -> None:
        if trainer.state.epoch + 1 >= self.n:
            raise StopTraining(f"after {self.n} epochs")


def original_paths(shards: list[Path]) -> dict[str, str]:
    """`<shard>#<key>` -> the file each sample was written from (its .json member)."""
    import json

    from visiontune.data.webdata import read_members

    return {f"{url}#{key}": json.loads(m["json"])["path"]
            for url in map(str, shards) for key, m in read_members(url, ("json",)).items()}


def by_path(preds: list) -> dict[str, np.ndarray]:
    """Each prediction's probabilities (classes in sorted order) by its path."""
    return {p.path: np.array([p.probs[c] for c in sorted(p.probs)]) for p in preds}


class WhenLogged(logging.Handler):
    """Runs `action` once, the first time a message holding `text` is logged under the
    `visiontune` logger: a fault timed to a point of the code under test by the code's own
    progress (a pool file removed between the pool's check and its read), nothing mocked.
    A context manager: the logger is set to INFO inside and put back after."""

    def __init__(self, text: str, action: Callable[[], None]) -> None:
        super().__init__(logging.INFO)
        self.text, self.action, self.fired = text, action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and self.text in record.getMessage():
            self.fired = True
            self.action()

    def __enter__(self) -> WhenLogged:
        logger = logging.getLogger("visiontune")
        self.level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("visiontune")
        logger.removeHandler(self)
        logger.setLevel(self.level)
