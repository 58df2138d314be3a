"""`visiontune serve` says what the model does not know: the prediction set (--coverage) and
"unknown" in the JSON answer and on the page, /metrics in Prometheus' text format, and the
drift warning once per window of unknown answers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visiontune as vt
from conftest import TINY, make_class_folders, make_image, page_with_answer, serve_in_thread

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

RED, GREEN = (220, 40, 40), (40, 200, 60)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two colours, 12 validation images: enough held-out scores for a guarantee at 0.8
    (4 needed), too few for 0.95 (19 needed: every set holds both classes)."""
    root = tmp_path_factory.mktemp("serve_uncertainty")
    data = make_class_folders(root / "data", {"red": 20, "green": 20})
    result = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=12, lr=5e-2, augment=False, valid_pct=0.3,
                                 output=str(root / "runs")))
    return Path(result.run_dir)


def with_ood(run: Path, dest: Path, **ood: float | str) -> Path:
    """A copy of `run` whose model.uncertainty "ood" entry (what the run stores for its
    out-of-distribution score, models/novelty.py) is changed: a threshold of -1 makes every
    answer unknown, 2 (the largest kNN distance) none."""
    shutil.copytree(run, dest)
    file = dest / "model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        metadata = dict(fh.metadata())
    meta = json.loads(metadata["visiontune"])
    meta["uncertainty"] = {**meta["uncertainty"], "ood": {**meta["uncertainty"]["ood"], **ood}}
    save_file(load_file(str(file)), str(file), metadata={**metadata, "visiontune": json.dumps(meta)})
    return dest


def post(client, image: Path) -> dict:
    r = client.post("/api/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_answer_carries_the_set_and_its_size_with_coverage(run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from visiontune.deploy.serve import create_app

    red = make_image(tmp_path / "red.png", RED, seed=101)
    plain = post(TestClient(create_app(run)), red)
    assert "set" not in plain and plain["unknown"] is False  # the run scores images: a bank of its own
    answer = post(TestClient(create_app(run, coverage=0.8)), red)
    assert answer["set"] == ["red"] and answer["set_size"] == 1 and answer["coverage"] == 0.8
    wide = post(TestClient(create_app(run, coverage=0.95)), red)  # too few held-out images: every class
    assert sorted(wide["set"]) == ["green", "red"] and wide["set_size"] == 2
    assert wide["predictions"][0]["label"] == "red"
    # the record is predict's (tasks/output.py), not a second format
    (pred,), _ = vt.predict(run, [str(red)], coverage=0.8)
    assert {k: v for k, v in answer.items() if k != "file"} == {k: v for k, v in pred.record().items() if k != "path"}


def test_a_run_without_held_out_scores_is_refused_at_start(run: Path, tmp_path: Path) -> None:
    from visiontune.deploy.serve import create_app
    from visiontune.errors import ConfigError

    bare = with_ood(run, tmp_path / "bare", threshold=2.0)
    file = bare / "model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        metadata = dict(fh.metadata())
    meta = json.loads(metadata["visiontune"])
    meta["uncertainty"] = {}
    save_file(load_file(str(file)), str(file), metadata={**metadata, "visiontune": json.dumps(meta)})
    with pytest.raises(ConfigError, match="no prediction sets"):
        create_app(bare, coverage=0.9)


def test_unknown_answers_carry_the_flag_and_the_score(run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from visiontune.deploy.serve import create_app

    red = make_image(tmp_path / "red.png", RED, seed=102)
    unknown = post(TestClient(create_app(with_ood(run, tmp_path / "all", threshold=-1.0))), red)
    known = post(TestClient(create_app(with_ood(run, tmp_path / "none", threshold=2.0))), red)
    assert unknown["unknown"] is True and known["unknown"] is False
    (pred,), _ = vt.predict(run, [str(red)], engine="torch")  # the model's own score, as predict gives it
    assert unknown["ood_score"] == pytest.approx(pred.decoded.ood_score, abs=1e-4) == known["ood_score"]
    # with the run's own threshold: noise is unknown, a new red square is not
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(noise)
    client = TestClient(create_app(run))
    assert post(client, noise)["unknown"] is True and post(client, red)["unknown"] is False


def test_metrics_parse_as_prometheus_text_with_the_requests_made(run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from visiontune.deploy.serve import create_app

    client = TestClient(create_app(with_ood(run, tmp_path / "all", threshold=-1.0), max_bytes=100_000,
                                   drift_window=10), raise_server_exceptions=False)
    red, green = make_image(tmp_path / "r.png", RED, seed=103), make_image(tmp_path / "g.png", GREEN, seed=104)
    tops = [post(client, image)["predictions"][0]["prob"] for image in (red, green, red)]
    assert client.post("/api/predict", files={"file": ("x.png", b"not an image", "image/png")}).status_code == 415
    assert client.post("/api/predict", files={"file": ("big.png", b"\0" * 200_000, "image/png")}).status_code == 413
    assert client.get("/").status_code == 200  # the page is not a prediction request
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples[("visiontune_requests_total", (("outcome", "ok"),))] == 3
    assert samples[("visiontune_requests_total", (("outcome", "refused"),))] == 2
    assert samples[("visiontune_requests_total", (("outcome", "error"),))] == 0
    assert samples[("visiontune_request_seconds_count", ())] == 5
    assert samples[("visiontune_request_seconds_bucket", (("le", "+Inf"),))] == 5
    assert samples[("visiontune_unknown_answers_total", ())] == 3
    assert samples[("visiontune_top_probability_count", ())] == 3
    assert samples[("visiontune_top_probability_sum", ())] == pytest.approx(sum(tops), abs=1e-6)
    assert samples[("visiontune_unknown_share", ())] == 1.0


def test_two_apps_count_apart(run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from visiontune.deploy.serve import create_app

    first, second = TestClient(create_app(run)), TestClient(create_app(run))
    post(first, make_image(tmp_path / "r.png", RED, seed=105))
    assert 'visiontune_requests_total{outcome="ok"} 1.0' in first.get("/metrics").text
    assert 'visiontune_requests_total{outcome="ok"} 0.0' in second.get("/metrics").text


def _drift_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "drift" in r.getMessage()]


def test_drift_is_warned_once_per_window_of_unknown_answers_and_never_for_known_ones(
        run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from visiontune.deploy.serve import create_app

    red = make_image(tmp_path / "red.png", RED, seed=106)
    caplog.set_level(logging.WARNING, logger="visiontune")
    known = TestClient(create_app(with_ood(run, tmp_path / "none", threshold=2.0, valid_unknown_share=0.05),
                                  drift_window=4, drift_margin=0.1))
    for _ in range(8):
        assert post(known, red)["unknown"] is False
    assert _drift_warnings(caplog) == []
    unknown = TestClient(create_app(with_ood(run, tmp_path / "all", threshold=-1.0, valid_unknown_share=0.05),
                                    drift_window=4, drift_margin=0.1))
    for _ in range(3):
        post(unknown, red)
    assert _drift_warnings(caplog) == []  # not a full window yet
    for _ in range(4):  # answers 4 to 7: one window, one warning
        post(unknown, red)
    (warning,) = _drift_warnings(caplog)
    assert "100% of the last 4 answers" in warning and "validation split had 5%" in warning
    post(unknown, red)  # the 8th: a second full window since the warning
    assert len(_drift_warnings(caplog)) == 2


def test_the_page_shows_the_set_and_that_the_image_is_unlike_the_training_ones(run: Path, tmp_path: Path) -> None:
    from visiontune.deploy.serve import create_app

    apps = {"unknown": create_app(with_ood(run, tmp_path / "all", threshold=-1.0), coverage=0.95),
            "known": create_app(run, coverage=0.8)}
    image = make_image(tmp_path / "upload_red.png", RED, seed=107)
    shown = {}
    for name, app in apps.items():
        port, server, thread = serve_in_thread(app)
        try:
            with page_with_answer(port, image, f"serve_{name}.png", tmp_path) as page:
                shown[name] = {"set": page.inner_text("#set"), "unknown_visible": page.is_visible("#unknown"),
                               "unknown": page.inner_text("#unknown")}
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    assert shown["unknown"]["set"] in ("95% set: red or green (2)", "95% set: green or red (2)")
    assert shown["unknown"]["unknown_visible"]
    assert shown["unknown"]["unknown"].startswith("This does not look like anything I was trained on (score ")
    assert shown["known"]["set"] == "80% set: red (1)" and not shown["known"]["unknown_visible"]
