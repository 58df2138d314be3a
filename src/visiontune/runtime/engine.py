"""What runs a frozen forward pass on the CPU: PyTorch eager, or ONNX Runtime.

ONNX Runtime runs the same Lite0 at 224 px about 2.8x faster than eager PyTorch on this
machine's CPU (bench/RESULTS.md, "predict at raw speed"), so every pass whose weights do not
change (frozen features for feature-extract, gradual's head phase, the advisor, interpret;
and predict/evaluate through deploy/export.py) can run there.

- `ENGINES` (config.py, the registry --engine offers): "auto" (ONNX Runtime on the CPU when onnx + onnxruntime are installed and the
  export works), "torch", "onnx" (insist; an error when it cannot).
- `write_onnx`: the one ONNX writer (PyTorch's torch.export-based exporter, dynamic batch,
  metadata inside); deploy/export.py writes whole models with it.
- `frozen_engine`: the backbone as an ONNX Runtime session, exported once per weights
  digest and input size into `<cache>/engines/` (never into the user's run folder) and
  checked against eager on every load: a session whose outputs differ by more than
  FEATURE_TOLERANCE is not used (PyTorch runs, with a warning). So the feature cache does
  not name the engine: what either engine computes is the same features within that
  tolerance (tests/runtime/test_engine.py).
- On a GPU PyTorch stays (channels_last, fp32 with TF32 convolutions): `frozen_engine`
  returns the backbone. Not bf16: it would move the features by ~2% of their scale (20x
  FEATURE_TOLERANCE, so the cache would have to name the precision) for nothing: on an
  H200 Lite0's raw forward runs at 16,000 img/s in fp32 and 22,700 in bf16, so bf16 would
  save 0.04 s of a cold feature-extract over 2,048 JPEGs that took 19.5 s (decoding, the
  probe's search, start-up; bench/gpu.py b).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.caches import Cache, guarded, touch
from visiontune.config import ENGINES
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.files import atomic_write
from visiontune.runtime.device import eval_mode

log = logging.getLogger(__name__)

FEATURE_TOLERANCE = 1e-3  # max |eager - ONNX Runtime| over a check batch, relative to the features' largest value
ONNX_OPSET = 18
EXPORT_PAYS_AT = 600  # images (counted at 224 px, by pixels) from which "auto" exports: see below
# exports that failed in this process (their path -> why): not tried again; another cache
# folder exports these weights anew (a stale file in one cache refused the weights everywhere)
_REFUSED: dict[str, str] = {}
_SESSIONS: dict[str, nn.Module] = {}  # checked sessions of this process (export file -> session), the last few
KEEP_SESSIONS = 2  # a run's training and validation passes share one: loading and checking it costs ~0.2 s


def onnx_available() -> bool:
    """Whether an ONNX file can be run here (onnx + onnxruntime; writing one also needs
    onnxscript, which write_onnx asks for)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def check_engine(engine: str) -> str:
    if engine not in ENGINES:  # the message predates the registry's: kept as users and tests know it
        raise ConfigError(f"engine {engine!r} unknown; choose one of {', '.join(ENGINES)}")
    return engine


def module_digest(module: nn.Module) -> str:
    """The digest of every tensor of `module` (parameters and buffers) and their names."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class EngineCache(Cache):
    """Frozen backbones exported to ONNX: `<cache root>/engines/<key>.onnx`, a file each,
    keyed by the digest of the backbone's tensors and the input size."""

    area = "engines"
    folder = "engines"
    keyed_by = "content"

    @staticmethod
    def key(backbone: nn.Module, image_size: int) -> str:
        return f"{module_digest(backbone)}-{image_size}"


def write_onnx(model: nn.Module, example: torch.Tensor, target: str | os.PathLike[str], meta: dict[str, str],
               opset: int = ONNX_OPSET, output_name: str | tuple[str, ...] = "logits") -> None:
    """`model` as ONNX at `target` (written atomically): input "image" with a dynamic
    batch, output `output_name` (a tuple: one name per output of a model that returns
    several), `meta` in the file's metadata_props."""
    names = [output_name] if isinstance(output_name, str) else list(output_name)
    try:
        import onnx
        import onnxscript  # noqa: F401 - the torch.export-based exporter needs it
    except ImportError:
        raise VisiontuneError("ONNX export needs onnx, onnxscript and onnxruntime: "
                              "pip install 'visiontune[export]'") from None

    def write(tmp: str) -> None:
        program = torch.onnx.export(model, (example,), input_names=["image"], output_names=names,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset,
                                    dynamo=True, verbose=False)
        program.save(tmp)  # weights inside the one file (small models) or beside it (> 2 GB)
        proto = onnx.load(tmp)
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)

    atomic_write(target, write)


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind the nn.Module interface of a forward pass: `forward`
    gives its first output; `scored` also its second, a model's OOD score (models/novelty.py;
    None for a file without one)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scored(x)[0]

    def scored(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.session.run(None, {self.input: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(out[0]), torch.from_numpy(out[1]) if len(out) > 1 else None


def onnx_session(path: str | os.PathLike[str], device: torch.device | None = None) -> OnnxModule:
    """An ONNX Runtime session of the file on `device` (default: the CPU, with PyTorch's
    thread count); a CUDA session that ONNX Runtime could only make on the CPU (no CUDA or
    cuDNN libraries found) is refused, never run on the CPU in its stead."""
    import onnxruntime as ort

    device = device or torch.device("cpu")
    providers = onnx_providers(device, ort.get_available_providers())
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != _provider_name(providers[0]):
        raise ConfigError(f"--device {device}: ONNX Runtime could not start {_provider_name(providers[0])} "
                          f"(it runs on {', '.join(session.get_providers())}: see its warning above for the "
                          f"missing CUDA/cuDNN library); use --device cpu")
    return OnnxModule(session)


def onnx_providers(device: torch.device, available: list[str]) -> list[Any]:
    """ONNX Runtime's execution providers for `device`, given those this onnxruntime has
    (`available`): the CPU's; on cuda:N CUDA's for that GPU, then the CPU's for the
    operators CUDA's lacks. A ConfigError where this onnxruntime has none for `device`."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    fix = ("install onnxruntime-gpu in place of onnxruntime, or use --device cpu" if device.type == "cuda" else
           "use --device cpu, or the .pt2 export, which runs on any PyTorch device")
    raise ConfigError(f"--device {device}: this onnxruntime runs on {', '.join(available)} only; {fix}")


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def frozen_engine(backbone: nn.Module, image_size: int, device: torch.device, engine: str = "auto",
                  cache_dir: str | os.PathLike[str] | None = None, images: int | None = None) -> nn.Module:
    """What computes `backbone(x)` for x of (N, 3, image_size, image_size) in eval mode:
    `backbone` itself, or its ONNX Runtime session (see the module docstring). "auto" with
    `images` (how many it will see): an export made earlier is always used; a new one only
    when the images are enough to pay for it (EXPORT_PAYS_AT, in 224 px images)."""
    check_engine(engine)
    if engine == "torch" or device.type != "cpu":
        if engine == "onnx" and device.type != "cpu":
            raise ConfigError(f"engine 'onnx' runs on the CPU only; use --device cpu or --engine torch "
                              f"(device: {device})")
        return backbone
    if not onnx_available():
        if engine == "onnx":
            raise VisiontuneError("engine 'onnx' needs onnx and onnxruntime: pip install 'visiontune[export]'")
        return backbone
    key = EngineCache.key(backbone, image_size)
    target = EngineCache.location(cache_dir) / f"{key}.onnx"
    if engine == "auto" and images is not None and images * (image_size / 224) ** 2 < EXPORT_PAYS_AT \
            and not target.is_file():
        return backbone
    try:
        if str(target) in _REFUSED:
            raise VisiontuneError(_REFUSED[str(target)])
        if str(target) not in _SESSIONS or not target.is_file():  # an export deleted since: made, checked again
            with eval_mode(backbone):
                _SESSIONS[str(target)] = _checked_session(backbone, image_size, key, target)
            while len(_SESSIONS) > KEEP_SESSIONS:
                _SESSIONS.pop(next(iter(_SESSIONS)))
        return _SESSIONS[str(target)]
    except Exception as exc:  # noqa: BLE001 - any failure of the exporter or the runtime: PyTorch runs
        _REFUSED[str(target)] = str(exc)
        if engine == "onnx":
            raise VisiontuneError(f"ONNX Runtime cannot run this backbone: {exc}") from exc
        log.warning("frozen forward passes run in PyTorch: ONNX Runtime is not usable for this backbone (%s)", exc)
        return backbone


def _checked_session(backbone: nn.Module, image_size: int, key: str, target: Path) -> nn.Module:
    """The session of the export at `target` (exported now if missing), checked against eager."""
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if not target.is_file():
        with torch.inference_mode(False), torch.no_grad():
            stored = guarded("the engine cache", lambda: write_onnx(backbone, example, target, {"digest": key},
                                                                  output_name="features") or True, False)
        if not stored:  # a cache that cannot be written: export beside the process, used once
            import tempfile

            target = Path(tempfile.mkdtemp(prefix="visiontune-engine-")) / f"{key}.onnx"
            write_onnx(backbone, example, target, {"digest": key}, output_name="features")
        log.info("frozen forward passes: backbone exported to ONNX once for these weights (%s)", target)
    touch(target)  # used now: the size cap evicts the least recently used (caches.evict)
    session = onnx_session(target)
    with torch.inference_mode():
        eager = backbone(example).float()
        ours = session(example).float()
    diff = float((eager - ours).abs().max()) / max(1.0, float(eager.abs().max()))
    if ours.shape != eager.shape or not diff <= FEATURE_TOLERANCE:
        raise VisiontuneError(f"its outputs differ from PyTorch's by {diff:.2e} (> {FEATURE_TOLERANCE})")
    return session
