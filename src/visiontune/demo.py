"""The main job, offline: scikit-image's `lfw_subset` (100 faces, 100 non-faces, 25x25 grey,
shipped inside the scikit-image wheel) written as an image folder, then fine-tuned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from visiontune import api
from visiontune.config import RunConfig
from visiontune.errors import VisiontuneError


def write_lfw_subset(root: str | Path) -> Path:
    """Write `root/{train,test}/{faces,non-faces}/*.png`; return `root`."""
    try:
        from skimage import data
    except ImportError:
        raise VisiontuneError("the demo needs scikit-image: pip install 'visiontune[demo]'") from None
    images = data.lfw_subset()  # (200, 25, 25) floats in [0, 1]; first 100 faces
    root = Path(root)
    for i, img in enumerate(images):
        label = "faces" if i < 100 else "non-faces"
        split = "test" if i % 5 == 0 else "train"  # 40 held-out test images, 20 per class
        out = root / split / label / f"{label}_{i:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists():
            Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(out)
    return root


def run_demo(out: str, strategy: str, epochs: int, image_size: int) -> int:
    settings = dict(strategy=strategy, epochs=epochs, image_size=image_size, batch_size=32)
    RunConfig.create(None, path=str(Path(out) / "lfw_subset"), **settings)  # a bad option: refused before writing
    data_dir = write_lfw_subset(Path(out) / "lfw_subset")
    print(f"wrote 200 images to {data_dir}: train/ (160) and test/ (40), faces / non-faces")
    result = api.fit(data_dir, **settings, output=str(Path(out) / "runs"), seed=0)
    print(f"run: {result.run_dir}  ({result.seconds:.1f}s, best epoch {result.best_epoch})")
    print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    report = api.evaluate(result.run_dir, data_dir / "test")
    print("\nheld-out test images (visiontune evaluate RUN DATA/test):")
    print(report.format())
    return 0
