"""GPU checks (issues 21 and 23), one script for one short lease of a GPU machine.

    python -m bench.gpu WORK [--images 2048] [--batch-size 128] [--out report.json] [--skip a,b] [--dry-run]

Write its output to a file, not through a pipe filter (grep holds it in a buffer: a run
stopped at its limit then leaves nothing). `--dry-run` checks the script on a CPU;
`--smoke` is a dry run of section a on 16 images with one tiny model (CI).

On one CUDA device, each section on its own (a failure is reported and the next runs):
a. training img/s in bf16 + channels_last (precision auto) for Lite0 and ResNet-50:
   `visiontune` fine-tuning from JPEG files (loop = mean epoch after the first) against a
   raw bf16 training step (forward, backward, AdamW) of the same model on synthetic
   tensors; the model's training FLOPs per image (3x the forward's, counted by
   torch.utils.flop_counter) give the raw step's and visiontune's fraction of the GPU's
   bf16 peak (989 TFLOP/s dense on the H100/H200 data sheet; also against the matrix
   product's measured rate here);
b. frozen path: feature extraction img/s (visiontune's feature-extract, features
   computed from the JPEGs, then an unchanged re-run) against raw inference in bf16 and in
   fp32 (as feature extraction computes) for both models, and which ONNX Runtime
   providers exist;
c. fp16 + GradScaler: a Lite0 run in fp16 (the scaler must be on, losses finite) against
   the same run in bf16;
d. `--batch-size auto`: the batch chosen on the GPU, and the search's own time;
e. torchrun with nccl (world size 1): the run completes with backend "cpu:gloo,cuda:nccl"
   and matches the same run without torchrun;
f. crash + resume: a run SIGKILLed in its third epoch and resumed against the same run
   uninterrupted, with two uninterrupted runs as the noise floor (GPU kernels are not
   bit-exact run to run);
g. `--unlabeled` (issue 25): fine-tuning with the FixMatch consistency term on the GPU
   against the same run without the pool: completes, losses finite, pool images counted,
   seconds per epoch;
h. the input pipeline: Lite0 fine-tuning img/s with the default DataLoader workers (every
   core but one, kept across epochs) and with 8, each also with the workers started again
   every epoch (persistent_workers off, patched in here only to measure it: how it was
   before), against the raw bf16 step;
i. new batch shapes: a Lite0 bf16 training step's first and second time at four shapes
   (the full batch, a partial last batch, another image size, half the batch), with cuDNN's
   autotuner off and on: what a process pays each time it meets a shape (run it first,
   `--only i,...`: a section before it meets some of these shapes).

The report is written after each section (`--out`), so a run stopped at its limit keeps
what it measured. `--only g,h` runs just those sections.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import visiontune as vt
from bench.harness import Recorder, parser
from bench.speed import make_jpegs  # bench/speed.py's photo-like JPEGs
from visiontune.config import ModelConfig
from visiontune.models.classifier import create_classifier
from visiontune.runtime.batchsize import cuda_search

DEV = "cuda"  # --dry-run: "cpu", tiny models, to check this script before a lease
PEAK_BF16 = 989e12  # dense bf16 tensor-core peak, H100/H200 SXM data sheet
REPORT: dict = {}
OUT: Path | None = None
MODELS = [("tf_efficientnet_lite0", "pretrained"), ("timm:resnet50", "none")]


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                REPORT[name] = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
                REPORT[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            REPORT[name]["section_s"] = round(time.perf_counter() - started, 1)
            print(f"== {name}: {json.dumps(REPORT[name], default=str)[:3000]}", flush=True)
            if OUT is not None:  # after each section: a run stopped at its limit keeps what it measured
                OUT.write_text(json.dumps(REPORT, indent=1, default=str))
        return run
    return wrap


def px(size: int) -> int:
    """The image size a section uses (32 px in a --dry-run)."""
    return size if DEV == "cuda" else 32


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def matmul_rate() -> float:
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync()
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    return 10 * 2 * n ** 3 / (time.perf_counter() - started)


def model_for(backbone: str, weights: str) -> torch.nn.Module:
    model, _ = create_classifier(ModelConfig(backbone=backbone, weights=weights), 2)
    return model


def forward_flops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=DEV)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops()) / 2


def raw_step_rate(model: torch.nn.Module, size: int, batch: int, steps: int = 20) -> float:
    from visiontune.train.plan import set_train_modes

    model.train().to(memory_format=torch.channels_last)
    set_train_modes(model, "eval", "eval")  # as visiontune fine-tunes pretrained weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=DEV).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=DEV)
    for i in range(steps + 3):
        if i == 3:
            sync()
            started = time.perf_counter()
        train_step(model, opt, x, y)
    sync()
    return steps * batch / (time.perf_counter() - started)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One raw training step: forward in bf16 autocast (on CUDA), cross-entropy, backward, AdamW."""
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@torch.inference_mode()
def raw_infer_rate(model: torch.nn.Module, size: int, batch: int, steps: int = 20, bf16: bool = True) -> float:
    model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=DEV).contiguous(memory_format=torch.channels_last)
    for i in range(steps + 3):
        if i == 3:
            sync()
            started = time.perf_counter()
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda" and bf16):
            model(x)
    sync()
    return steps * batch / (time.perf_counter() - started)


def loop_rate(result, images: int) -> float:
    seconds = [row["seconds"] for row in result.history[1:]] or [result.history[0]["seconds"]]
    return images / (sum(seconds) / len(seconds))


@section("a_training")
def training(data: Path, work: Path, images: int, batch: int, models: list[tuple[str, str]]) -> dict:
    peak_measured = matmul_rate()
    out = {"matmul_bf16_tflops": round(peak_measured / 1e12, 1)}
    for backbone, weights in models:
        model = model_for(backbone, weights).to(DEV)
        flops = 3 * forward_flops(model, px(224))
        raw = raw_step_rate(model, px(224), batch)
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
        r = vt.fit(data, backbone=backbone, weights=weights, strategy="finetune", epochs=3, image_size=px(224),
                   batch_size=batch, valid_pct=0.0, progress=False, output=str(work / "runs"), patience=0)
        ours = loop_rate(r, images)
        cached = vt.fit(data, backbone=backbone, weights=weights, strategy="finetune", epochs=3, image_size=px(224),
                        batch_size=batch, valid_pct=0.0, progress=False, output=str(work / "runs"), patience=0,
                        augment="none")
        out[backbone] = {
            "train_gflops_per_image": round(flops / 1e9, 2), "raw_bf16_step_img_s": round(raw, 1),
            "visiontune_loop_img_s": round(ours, 1), "ratio": round(ours / raw, 3),
            "visiontune_loop_img_s_augment_none": round(loop_rate(cached, images), 1),
            "raw_fraction_of_peak": round(raw * flops / PEAK_BF16, 3),
            "raw_fraction_of_measured_matmul": round(raw * flops / peak_measured, 3),
            "visiontune_fraction_of_peak": round(ours * flops / PEAK_BF16, 3),
            "epoch_seconds": [round(row["seconds"], 2) for row in r.history],
        }
    return out


@section("b_frozen")
def frozen(data: Path, work: Path, images: int, batch: int) -> dict:
    raws, fp32 = {}, {}
    for backbone, weights in MODELS:
        model = model_for(backbone, weights).to(DEV)
        raws[backbone] = round(raw_infer_rate(model, px(224), 256), 1)
        fp32[backbone] = round(raw_infer_rate(model, px(224), 256, bf16=False), 1)  # as feature-extract computes
        del model
    raw = raws[MODELS[0][0]]
    started = time.perf_counter()
    r = vt.fit(data, backbone=MODELS[0][0], weights=MODELS[0][1], strategy="feature-extract", image_size=px(224), valid_pct=0.2, progress=False,
               output=str(work / "runs"), batch_size=batch)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    vt.fit(data, backbone=MODELS[0][0], weights=MODELS[0][1], strategy="feature-extract", image_size=px(224), valid_pct=0.2, progress=False,
           output=str(work / "runs"), batch_size=batch)
    warm = time.perf_counter() - started
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = ["onnxruntime not installed"]
    return {"raw_bf16_inference_img_s": raws, "raw_fp32_inference_img_s": fp32,
            "tf32_convolutions": torch.backends.cudnn.allow_tf32, "feature_extract_cold_s": round(cold, 2),
            "feature_extract_cold_ratio_to_raw": round(images / cold / raw, 3),
            "feature_extract_cold_img_s": round(images / cold, 1), "feature_extract_rerun_s": round(warm, 2),
            "rerun_speedup": round(cold / warm, 2), "onnxruntime_providers": providers,
            "valid_accuracy": r.metrics.get("accuracy")}


@section("c_fp16")
def fp16(data: Path, work: Path, batch: int) -> dict:
    from visiontune.train.callbacks import Callback

    class Scaler(Callback):
        scale: float | None = None

        def on_epoch_end(self, trainer):
            Scaler.scale = trainer.scaler.get_scale() if trainer.scaler is not None else None

    out = {}
    for precision in ("fp16", "bf16"):
        r = vt.fit(data, backbone=MODELS[0][0], weights=MODELS[0][1], strategy="finetune", precision=precision, epochs=3, image_size=px(160), batch_size=batch,
                   valid_pct=0.2, progress=False, output=str(work / "runs"), seed=3, callbacks=[Scaler()])
        losses = [row["train_loss"] for row in r.history]
        out[precision] = {"train_losses": [round(x, 4) for x in losses], "val_metrics": r.metrics,
                          "grad_scaler_scale": Scaler.scale, "finite": all(x == x and abs(x) < 1e9 for x in losses)}
    out["ok"] = out["fp16"]["finite"] and out["fp16"]["grad_scaler_scale"] is not None
    return out


@section("d_batch_auto")
def batch_auto(data: Path, work: Path) -> dict:
    out = {}
    for backbone, weights in MODELS:
        started = time.perf_counter()
        r = vt.fit(data, backbone=backbone, weights=weights, strategy="finetune", epochs=1, image_size=px(224),
                   batch_size="auto", valid_pct=0.2, progress=False, output=str(work / "runs"))
        import yaml

        config = yaml.safe_load((Path(r.run_dir) / "config.yaml").read_text())
        out[backbone] = {"chosen": config.get("train", {}).get("batch_size"),
                         "seconds_with_one_epoch": round(time.perf_counter() - started, 1)}
    if DEV != "cuda":
        return out
    model = model_for("timm:resnet50", "none").to(DEV)
    started = time.perf_counter()
    fitting, _ = cuda_search(model, 224, 4096, torch.device(DEV), True, "bf16")
    out["resnet50_largest_fitting_up_to_4096"] = {"batch": fitting, "search_s": round(time.perf_counter() - started, 1)}
    return out


WORKER = """
import json, os, sys
import visiontune as vt
args = json.loads(sys.argv[1])
r = vt.fit(**args) if "resume" not in args else vt.fit(resume=args["resume"])
import torch.distributed as dist
backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None
json.dump({"history": r.history, "backend": backend, "metrics": r.metrics},
          open(os.path.join(r.run_dir, "worker.json"), "w"))
"""

RECIPE = {"backbone": MODELS[0][0], "weights": MODELS[0][1], "strategy": "finetune", "image_size": 128, "batch_size": 64, "progress": False, "patience": 0,
          "lr": 1e-3, "seed": 11, "num_workers": 4, "valid_pct": 0.2}


def _weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _loss_diff(a: Path, b: Path) -> float:
    h1 = [json.loads(x) for x in (a / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (b / "history.jsonl").read_text().splitlines()]
    if len(h1) != len(h2):
        return float("inf")
    return max(abs(p[k] - q[k]) for p, q in zip(h1, h2) for k in ("train_loss", "val_loss"))


def _worker(work: Path, args: dict, torchrun: bool) -> list[str]:
    (work / "worker.py").write_text(WORKER)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if torchrun \
        else [sys.executable]
    return [*head, str(work / "worker.py"), json.dumps(args)]


@section("e_torchrun_nccl")
def torchrun_nccl(data: Path, work: Path) -> dict:
    out_dir = work / "ddp"
    subprocess.run(_worker(work, {**RECIPE, "data": str(data), "output": str(out_dir), "name": "plain",
                                  "epochs": 3}, False), check=True)
    done = subprocess.run(_worker(work, {**RECIPE, "data": str(data), "output": str(out_dir), "name": "torchrun",
                                         "epochs": 3}, True), capture_output=True, text=True)
    if done.returncode:
        return {"ok": False, "returncode": done.returncode, "stderr": done.stderr[-3000:]}
    a, b = out_dir / "plain", out_dir / "torchrun"
    info = json.loads((b / "worker.json").read_text())
    plain = json.loads((a / "worker.json").read_text())
    return {"ok": "nccl" in str(info["backend"]), "backend": info["backend"],
            "metrics_torchrun": info["metrics"], "metrics_plain": plain["metrics"],
            "max_weight_diff": _weights_diff(a, b), "max_loss_diff": _loss_diff(a, b)}


@section("f_crash_resume")
def crash_resume(data: Path, work: Path) -> dict:
    out_dir = work / "resume"
    epochs = 5
    for name in ("ref1", "ref2"):
        subprocess.run(_worker(work, {**RECIPE, "data": str(data), "output": str(out_dir), "name": name,
                                      "epochs": epochs}, False), check=True)
    proc = subprocess.Popen(_worker(work, {**RECIPE, "data": str(data), "output": str(out_dir), "name": "crashed",
                                           "epochs": epochs}, False))
    history = out_dir / "crashed" / "history.jsonl"
    while proc.poll() is None and not (history.is_file() and history.read_text().count("\n") >= 2):
        time.sleep(0.05)
    epoch_s = json.loads((out_dir / "ref1" / "history.jsonl").read_text().splitlines()[2])["seconds"]
    time.sleep(0.4 * epoch_s)  # into the third epoch
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = history.read_text().count("\n") if history.is_file() else 0
    subprocess.run(_worker(work, {"resume": str(out_dir / "crashed")}, False), check=True)
    ref1, ref2, crashed = out_dir / "ref1", out_dir / "ref2", out_dir / "crashed"
    noise_w, noise_l = _weights_diff(ref1, ref2), _loss_diff(ref1, ref2)
    resumed_w, resumed_l = _weights_diff(ref1, crashed), _loss_diff(ref1, crashed)
    return {"killed": killed, "epochs_logged_at_kill": at_kill,
            "epochs_after_resume": history.read_text().count("\n"),
            "noise_weight_diff": noise_w, "noise_loss_diff": noise_l,
            "resumed_weight_diff": resumed_w, "resumed_loss_diff": resumed_l,
            "killed_after_s_into_epoch_3": round(0.4 * epoch_s, 2),
            "ok": killed and 1 <= at_kill < epochs and resumed_l <= max(10 * noise_l, 1e-3)}


@section("g_unlabeled")
def unlabeled(data: Path, work: Path, batch: int) -> dict:
    pool = make_jpegs(work / "pool", 1024 if DEV == "cuda" else 16, seed=1, flat=True)
    out = {}
    for name, extra in (("without_pool", {}), ("with_pool", {"unlabeled": str(pool)})):
        r = vt.fit(data, backbone=MODELS[0][0], weights=MODELS[0][1], strategy="finetune", epochs=3, image_size=px(160),
                   batch_size=batch, valid_pct=0.2, progress=False, output=str(work / "runs"), seed=5, patience=0,
                   name=f"unlabeled_{name}", **extra)
        run = Path(r.run_dir)
        rows = (run / "consistency.csv").read_text().splitlines() if (run / "consistency.csv").is_file() else []
        losses = [row["train_loss"] for row in r.history]
        out[name] = {"epoch_s": [round(row["seconds"], 2) for row in r.history],
                     "train_losses": [round(x, 4) for x in losses],
                     "finite": all(x == x and abs(x) < 1e9 for x in losses), "val_metrics": r.metrics,
                     "consistency_csv": rows[:5]}
    out["ok"] = out["with_pool"]["finite"] and len(out["with_pool"]["consistency_csv"]) > 1
    return out


@section("h_pipeline")
def pipeline(data: Path, work: Path, images: int, batch: int) -> dict:
    import visiontune.data.loaders as loaders

    model = model_for(*MODELS[0]).to(DEV)
    raw = raw_step_rate(model, px(224), batch)
    del model
    out = {"raw_bf16_step_img_s": round(raw, 1), "default_workers": loaders.default_num_workers(torch.device(DEV))}
    plain = loaders.DataLoader

    def fresh(*args, **kwargs):  # workers started again each epoch, as before persistent_workers
        return plain(*args, **{**kwargs, "persistent_workers": False})

    variants = (("default", None, False), ("default_not_persistent", None, True), ("8_workers", 8, False),
                ("8_workers_not_persistent", 8, True))
    for name, workers, started_again in variants:
        loaders.DataLoader = fresh if started_again else plain
        try:
            r = vt.fit(data, backbone=MODELS[0][0], weights=MODELS[0][1], strategy="finetune", epochs=4,
                       image_size=px(224), batch_size=batch, valid_pct=0.0, progress=False, patience=0,
                       output=str(work / "runs"), num_workers=workers if DEV == "cuda" or workers is None else 2)
        finally:
            loaders.DataLoader = plain
        ours = loop_rate(r, images)
        out[name] = {"loop_img_s": round(ours, 1), "ratio_to_raw": round(ours / raw, 3),
                     "epoch_seconds": [round(row["seconds"], 2) for row in r.history]}
    return out


@section("i_new_shapes")
def new_shapes(batch: int) -> dict:
    """What a training step costs the first time it meets a batch shape in a process (g paid
    22 s in its first epoch, d 79 s for Lite0's batch search), with cuDNN's autotuner off
    (PyTorch's default, and visiontune's) and on: each shape's first step, then its second."""
    out = {}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        model = model_for(*MODELS[0]).to(DEV).train().to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rows = {}
        for size, n in ((px(224), batch), (px(224), batch - 26), (px(160), batch), (px(224), batch // 2)):
            times = []
            for _ in range(2):
                x = torch.randn(n, 3, size, size, device=DEV).contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, 2, (n,), device=DEV)
                sync()
                started = time.perf_counter()
                train_step(model, opt, x, y)
                sync()
                times.append(round(time.perf_counter() - started, 3))
            rows[f"{n}x{size}px"] = {"first_s": times[0], "second_s": times[1]}
        out[f"cudnn_benchmark_{benchmark}"] = rows
        del model, opt
    torch.backends.cudnn.benchmark = False
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("work", nargs="?")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="check this script on a CPU with tiny models")
    ap.add_argument("--log", action="store_true", help="print visiontune's own INFO log (timestamped) too")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: a,b,c,d,e,f,g,h,i")
    ap.add_argument("--only", default="", help="comma-separated sections to run, in this order (default: all)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.dry_run, a.images, a.batch_size, a.only = True, 16, 8, a.only or "a"
        a.work = a.work or tempfile.mkdtemp(prefix="vt-bench-gpu-")
    elif a.work is None:
        ap.error("WORK is required (or --smoke)")
    global DEV, MODELS, OUT
    OUT = Path(a.out) if a.out else None
    if a.dry_run:  # this script's own check, on a CPU: tiny model, 32 px
        DEV, MODELS = "cpu", [("timm:test_efficientnet", "none"), ("timm:test_resnet", "none")]
        RECIPE.update(backbone=MODELS[0][0], weights="none", image_size=32, num_workers=0)
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    if a.log:
        import logging

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logging.getLogger("visiontune").addHandler(handler)
        logging.getLogger("visiontune").setLevel(logging.INFO)
    work = Path(a.work)
    os.environ.setdefault("VISIONTUNE_CACHE", str(work / "cache"))
    os.environ.setdefault("VISIONTUNE_OFFLINE", "1")
    import timm

    REPORT["env"] = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "none (dry run)", "torch": torch.__version__, "timm": timm.__version__,
                     "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print("== env:", REPORT["env"], flush=True)
    data = make_jpegs(work / "data", a.images)
    sections = {
        "a": lambda: training(data, work, a.images, a.batch_size, MODELS[:1] if a.smoke else MODELS),
        "b": lambda: frozen(data, work, a.images, a.batch_size),
        "c": lambda: fp16(data, work, a.batch_size),
        "d": lambda: batch_auto(data, work),
        "e": lambda: torchrun_nccl(data, work),
        "f": lambda: crash_resume(data, work),
        "g": lambda: unlabeled(data, work, a.batch_size),
        "h": lambda: pipeline(data, work, a.images, a.batch_size),
        "i": lambda: new_shapes(a.batch_size),
    }
    order = [x for x in a.only.split(",") if x] or list(sections)
    skip = set(a.skip.split(","))
    for key in order:
        if key not in skip:
            sections[key]()
    return record_report(Recorder("gpu", a.smoke, argv))


def record_report(record: Recorder) -> int:
    """One row per section: its numeric results as JSON, or its error; 1 when one failed."""
    failed = 0
    for name, result in REPORT.items():
        if name == "env":
            continue
        failed += "error" in result
        record(f"{name} ({DEV})", "error" if "error" in result else "ok", note=json.dumps(
            result.get("error") or {k: v for k, v in result.items() if k != "trace"}, default=str)[:1500])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
