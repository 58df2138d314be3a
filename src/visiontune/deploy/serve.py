"""`visiontune serve RUN`: a small web app on localhost — a page to drop an image and see
the predicted labels, and a JSON API (`POST /api/predict`, multipart field `file`).

Built to stay responsive under load on a small machine:
- an upload larger than `max_bytes` is refused (413) from its Content-Length header before
  a byte of it is read (a chunked upload is counted as it streams and cut off at the limit);
- an image whose header announces more than `max_pixels` pixels is refused (413) before
  it is decoded (a 17 KB PNG can announce 144 megapixels); anything that does not decode
  as an image gets 415; every refusal has a JSON `detail`;
- an image PIL itself takes for a decompression bomb (past its own limit) gets 413 too;
- decoding runs in the thread pool, at most `max_decodes` at once (a decoded 50 MP image is
  150 MB), and inference in one model thread that batches the requests waiting at that
  moment (up to `max_batch`), so the event loop never blocks: the page and other requests
  are answered while the model works;
- at most `max_pending` requests are decoding or waiting for the model at once; past that a
  request gets 503 with Retry-After at once, so the backlog (and its memory) stays bounded;
- `serve` answers only requests addressed to this machine, `--host` and `--allowed-host`
  (visiontune.web: another site's page cannot drive it through DNS rebinding).

What the model does not know: with `coverage` each answer carries its prediction set
(interval), and with an out-of-distribution score in the run (model.uncertainty["ood"]) its
score and `unknown`, in the task's JSON record (tasks/output.py, as predict writes it); the
page shows them. `GET /metrics` and the drift warning: deploy/monitor.py.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time, and UploadFile is imported inside create_app (fastapi is an optional extra).
import asyncio
import html
import io
import json
import logging
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from visiontune.bundle import Bundle, OodRequest, SetRequest, load_bundle
from visiontune.cpus import usable_cpus
from visiontune.data.images import TooManyPixels, load_rgb
from visiontune.data.transforms import eval_side, eval_transform
from visiontune.deploy.monitor import DEFAULT_UNKNOWN_SHARE, DriftWatch, MetricsMiddleware, ServeMetrics
from visiontune.errors import VisiontuneError
from visiontune.runtime.batchsize import MicroBatcher
from visiontune.runtime.device import to_device
from visiontune.runtime.inference import forward_scored
from visiontune.tasks.base import Decoded
from visiontune.web import serve_app

log = logging.getLogger(__name__)

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 50_000_000  # a 48 MP phone photo fits; a 12000 x 12000 decompression bomb does not
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file in a request body
MAX_PENDING = 64  # requests decoding or waiting for the model; more get 503 + Retry-After
RETRY_AFTER_S = 1
PREDICT_PATH = "/api/predict"
DRIFT_WINDOW = 200  # answers the share of unknown ones is taken over (/metrics, the drift warning)
DRIFT_MARGIN = 0.1  # warn when that share exceeds the validation split's by this much

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>visiontune</title>
<style>body{font-family:system-ui,sans-serif;max-width:640px;margin:3em auto}
#drop{border:2px dashed #888;padding:2em;text-align:center;border-radius:8px}
#drop.over{background:#eef}table{margin-top:1em;border-collapse:collapse}
td{padding:.3em .8em;border-bottom:1px solid #ddd}.err{color:#b00020}.chosen{font-weight:bold}.unknown{color:#8a4b00;font-weight:bold}</style></head><body>
<h1>visiontune</h1><p>Model: <b>__NAME__</b>, classes: __CLASSES__</p>
<div id="drop">Drop an image here, or <input id="file" type="file" accept="image/*"></div>
<div id="result"></div>
<script>
const drop = document.getElementById('drop'), result = document.getElementById('result');
function note(id, shown, text) {  // a line shown only when the answer carries it
  if (!shown) return;
  const el = document.getElementById(id); el.textContent = text(); el.hidden = false;
}
async function send(file) {
  const body = new FormData(); body.append('file', file);
  result.textContent = 'classifying...';
  const r = await fetch('api/predict', {method: 'POST', body});
  const data = await r.json();
  if (!r.ok) { result.innerHTML = '<p class="err" id="error"></p>';
               document.getElementById('error').textContent = data.detail; return; }
  result.innerHTML = '<p id="unknown" class="unknown" hidden></p><p id="labels"></p><p id="set" hidden></p>'
    + '<table id="predictions"></table>';
  note('unknown', data.unknown, () => 'This does not look like anything I was trained on (score '
    + Number(data.ood_score).toPrecision(3) + ').');
  note('set', 'set' in data, () => +(100 * data.coverage).toPrecision(4) + '% set: '
    + (data.set.join('probs' in data ? ', ' : ' or ') || '(none)') + ' (' + data.set_size + ')');
  note('set', 'interval' in data, () => +(100 * data.coverage).toPrecision(4) + '% interval: ['
    + data.interval.map(v => Number(v).toPrecision(4)).join(', ') + ']');
  if ('prediction' in data) {  // regression: one number
    document.getElementById('labels').textContent = 'Predicted: ' + Number(data.prediction).toPrecision(4);
    return;
  }
  document.getElementById('labels').textContent = data.labels.length
    ? 'Predicted: ' + data.labels.join(', ') : 'No label above its threshold; the most probable:';
  const table = document.getElementById('predictions');
  for (const p of data.predictions) {
    const row = table.insertRow(); row.className = 'prediction' + (data.labels.includes(p.label) ? ' chosen' : '');
    row.insertCell().textContent = p.label; row.insertCell().textContent = (100 * p.prob).toFixed(1) + '%';
  }
}
document.getElementById('file').addEventListener('change', e => send(e.target.files[0]));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); send(e.dataTransfer.files[0]); });
</script></body></html>"""


class LimitRequestBody:
    """ASGI middleware: POST bodies over `limit` bytes get 413 before the application (and
    its multipart parser) reads them: by Content-Length, or, for a chunked body, as soon as
    the bytes counted pass the limit (the application then sees the client disconnect and
    its own response is dropped)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_413(send, f"upload of {int(length)} bytes is larger than the {self.limit} allowed")
            return
        seen, refused, started = 0, False, False

        async def counted() -> dict:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                refused = True
                if not started:
                    await _send_413(send, f"upload larger than the {self.limit} bytes allowed")
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been sent
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, guarded_send)


async def _send_413(send: Any, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BatchPredictor:
    """One thread runs the model; requests put their image tensors on a queue and wait on a
    future. The thread takes every request waiting (up to `max_batch`) as one batch. `sets`
    (--coverage) gives each answer its prediction set; `ood` (a model that scores how unlike
    its training images an image is: models/novelty.py) its score and whether it is unknown."""

    def __init__(self, bundle: Bundle, top_k: int, max_batch: int = 16, sets: SetRequest | None = None,
                 ood: OodRequest | None = None) -> None:
        self.bundle, self.top_k, self.max_batch = bundle, top_k, max_batch
        self.sets, self.ood = sets, ood
        self.micro = MicroBatcher()
        self.queue: queue.Queue[tuple[torch.Tensor, Future]] = queue.Queue()
        threading.Thread(target=self._run, name="visiontune-model", daemon=True).start()

    def submit(self, x: torch.Tensor) -> Future:
        future: Future = Future()
        self.queue.put((x, future))
        return future

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self._predict(torch.stack([x for x, _ in batch]))
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)

    @torch.inference_mode()
    def _predict(self, x: torch.Tensor) -> list[Decoded]:
        """Per image, the task's Decoded: the predicted labels (one class; multi-label: every
        label above its threshold, maybe none), the top-k ranked with probabilities, and with
        --coverage the set, with an OOD score the score and `unknown`."""
        task, device = self.bundle.task, torch.device("cpu")  # load_bundle's device
        # the runtime's forward pass, as predict's: autocast by --precision auto, halved on out-of-memory
        logits, scores = forward_scored(self.bundle.model, to_device(x, device, True), self.micro, device, "auto",
                                        score=self.ood is not None)
        probs = np.asarray(task.probabilities(logits).float().numpy())
        decoded = task.decode(probs, self.top_k)
        if self.sets is not None:
            self.sets.attach(task, probs, decoded)
        if self.ood is not None and scores is not None:
            self.ood.attach(scores.cpu().numpy(), decoded)
        return decoded


def _decoder(bundle: Bundle, max_pixels: int) -> Any:
    """upload bytes -> the model's input tensor, or HTTPException: 413 for an image with too
    many pixels (by its header, or by PIL's own bomb guard), 415 for anything unreadable."""
    from fastapi import HTTPException

    transform, side = eval_transform(bundle.preprocess), eval_side(bundle.preprocess)

    def decode(data: bytes, name: str | None) -> torch.Tensor:
        try:
            return transform(load_rgb(io.BytesIO(data), side, max_pixels=max_pixels))
        except (TooManyPixels, Image.DecompressionBombError) as exc:
            raise HTTPException(413, f"{name!r} is too large an image: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad upload
            raise HTTPException(415, f"{name!r} is not an image we can read ({type(exc).__name__})") from None

    return decode


def create_app(run: str | os.PathLike[str], top_k: int = 3, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS, max_pending: int = MAX_PENDING, max_decodes: int | None = None,
               coverage: float | None = None, drift_window: int = DRIFT_WINDOW,
               drift_margin: float = DRIFT_MARGIN) -> Any:
    """The app (see the module docstring); `max_decodes`: images decoded at once (default:
    the CPUs this process may use, cpus.usable_cpus); `coverage`: each answer carries its prediction set (interval);
    `drift_window`, `drift_margin`: /metrics' share of unknown answers is taken over the last
    `drift_window` answers, and a warning logged once per window when it exceeds the
    validation split's share by `drift_margin` (deploy/monitor.py)."""
    try:
        from fastapi import FastAPI
    except ImportError:
        raise VisiontuneError("serve needs fastapi, uvicorn and python-multipart: pip install 'visiontune[serve]'") \
            from None
    bundle = load_bundle(run)
    sets = SetRequest.of(bundle, coverage)  # a run without held-out scores is an error now, not per request
    ood_request = OodRequest.of(bundle)
    ood = (bundle.uncertainty or {}).get("ood") or {}
    metrics = ServeMetrics(DriftWatch(drift_window, float(ood.get("valid_unknown_share", DEFAULT_UNKNOWN_SHARE)),
                                      drift_margin))
    predictor = BatchPredictor(bundle, max(1, min(top_k, len(bundle.classes))), sets=sets, ood=ood_request)
    app = FastAPI(title="visiontune", docs_url=None, redoc_url=None)
    page = PAGE.replace("__NAME__", html.escape(os.path.basename(os.path.abspath(run)))).replace(
        "__CLASSES__", html.escape(", ".join(bundle.classes)))
    _add_routes(app, page, metrics)
    _add_predict(app, bundle, predictor, metrics, Limits(max_bytes, max_pixels, max_pending, max_decodes))
    return MetricsMiddleware(LimitRequestBody(app, max_bytes + MULTIPART_SLACK), metrics, PREDICT_PATH)


@dataclass(frozen=True)
class Limits:
    """What one upload may be, and how many are worked on at once (see the module docstring)."""

    max_bytes: int
    max_pixels: int
    max_pending: int
    max_decodes: int | None


def _add_routes(app: Any, page: str, metrics: ServeMetrics) -> None:
    """The page and /metrics."""
    from fastapi.responses import HTMLResponse, Response

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.text()
        return Response(body, media_type=content_type)


def _add_predict(app: Any, bundle: Bundle, predictor: BatchPredictor, metrics: ServeMetrics, limits: Limits) -> None:
    """POST /api/predict: the task's JSON record of the image's prediction (as predict --output x.json writes)."""
    from fastapi import HTTPException, UploadFile
    from fastapi.concurrency import run_in_threadpool

    decode, output = _decoder(bundle, limits.max_pixels), bundle.task.output
    probabilities = bundle.task.calibrator.kind != "none"  # a number has no confidence to average
    decodes = asyncio.Semaphore(limits.max_decodes or usable_cpus())
    pending = 0  # requests admitted and not answered yet (the event loop's thread only)

    @app.post(PREDICT_PATH)
    async def predict(file: UploadFile) -> dict[str, Any]:
        nonlocal pending
        if pending >= limits.max_pending:
            raise HTTPException(503, f"busy: {pending} images are waiting to be classified; retry shortly",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        pending += 1
        try:
            data = await file.read(limits.max_bytes + 1)
            if len(data) > limits.max_bytes:
                raise HTTPException(413, f"upload larger than {limits.max_bytes} bytes")
            async with decodes:
                x = await run_in_threadpool(decode, data, file.filename)
            decoded = await asyncio.wrap_future(predictor.submit(x))
        finally:
            pending -= 1
        metrics.answer(decoded.unknown, decoded.ranked[0][1] if probabilities and decoded.ranked else None)
        return {"file": file.filename, **output.record(decoded)}


def serve(run: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000, top_k: int = 3,
          max_pixels: int = MAX_PIXELS, max_pending: int = MAX_PENDING, allowed_hosts: Sequence[str] = (),
          coverage: float | None = None, drift_window: int = DRIFT_WINDOW, drift_margin: float = DRIFT_MARGIN) -> None:
    """Serve the app until Ctrl+C, answering only requests addressed to this machine, `host`
    or `allowed_hosts` (visiontune.web)."""
    serve_app(create_app(run, top_k, max_pixels=max_pixels, max_pending=max_pending, coverage=coverage,
                         drift_window=drift_window, drift_margin=drift_margin), host, port, allowed_hosts)
