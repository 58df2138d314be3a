"""`visiontune serve RUN`: a small web app on localhost — a page to drop an image and see
the top-k labels, and a JSON API (`POST /api/predict`, multipart field `file`).

Uploads over `max_bytes` get 413, anything that is not a decodable image 415, both with a
JSON `detail` saying what was wrong; the model is loaded once at start-up.
"""


# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time, and UploadFile is imported inside create_app (fastapi is an optional extra).
import html
import io
import os
from typing import Any

import torch

from visiontune.bundle import load_bundle
from visiontune.data.images import load_rgb
from visiontune.data.transforms import eval_side, eval_transform
from visiontune.errors import VisiontuneError

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>visiontune</title>
<style>body{font-family:system-ui,sans-serif;max-width:640px;margin:3em auto}
#drop{border:2px dashed #888;padding:2em;text-align:center;border-radius:8px}
#drop.over{background:#eef}table{margin-top:1em;border-collapse:collapse}
td{padding:.3em .8em;border-bottom:1px solid #ddd}.err{color:#b00020}</style></head><body>
<h1>visiontune</h1><p>Model: <b>__NAME__</b>, classes: __CLASSES__</p>
<div id="drop">Drop an image here, or <input id="file" type="file" accept="image/*"></div>
<div id="result"></div>
<script>
const drop = document.getElementById('drop'), result = document.getElementById('result');
async function send(file) {
  const body = new FormData(); body.append('file', file);
  result.textContent = 'classifying...';
  const r = await fetch('api/predict', {method: 'POST', body});
  const data = await r.json();
  if (!r.ok) { result.innerHTML = '<p class="err" id="error"></p>';
               document.getElementById('error').textContent = data.detail; return; }
  result.innerHTML = '<table id="predictions"></table>';
  const table = document.getElementById('predictions');
  for (const p of data.predictions) {
    const row = table.insertRow(); row.className = 'prediction';
    row.insertCell().textContent = p.label; row.insertCell().textContent = (100 * p.prob).toFixed(1) + '%';
  }
}
document.getElementById('file').addEventListener('change', e => send(e.target.files[0]));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); send(e.dataTransfer.files[0]); });
</script></body></html>"""


def create_app(run: str | os.PathLike[str], top_k: int = 3, max_bytes: int = 10 * 1024 * 1024) -> Any:
    try:
        from fastapi import FastAPI, HTTPException, UploadFile
        from fastapi.responses import HTMLResponse
    except ImportError:
        raise VisiontuneError("serve needs fastapi, uvicorn and python-multipart: pip install 'visiontune[serve]'") \
            from None
    bundle = load_bundle(run)
    transform, side = eval_transform(bundle.preprocess), eval_side(bundle.preprocess)
    k = max(1, min(top_k, len(bundle.classes)))
    app = FastAPI(title="visiontune", docs_url=None, redoc_url=None)
    page = PAGE.replace("__NAME__", html.escape(os.path.basename(os.path.abspath(run)))).replace(
        "__CLASSES__", html.escape(", ".join(bundle.classes)))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.post("/api/predict")
    async def predict(file: UploadFile) -> dict[str, Any]:
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload larger than {max_bytes} bytes")
        try:
            image = load_rgb(io.BytesIO(data), side)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad upload
            raise HTTPException(415, f"{file.filename!r} is not an image we can read ({type(exc).__name__})") \
                from None
        with torch.inference_mode():
            logits = bundle.model(transform(image).unsqueeze(0).to(memory_format=torch.channels_last))
        decoded = bundle.task.decode(bundle.task.probabilities(logits).numpy(), k)[0]
        return {"file": file.filename,
                "predictions": [{"label": label, "prob": prob} for label, prob in decoded.ranked]}

    return app


def serve(run: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000, top_k: int = 3) -> None:
    try:
        import uvicorn
    except ImportError:
        raise VisiontuneError("serve needs uvicorn: pip install 'visiontune[serve]'") from None
    uvicorn.run(create_app(run, top_k), host=host, port=port, log_level="warning")
