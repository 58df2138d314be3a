"""Write the bad-input corpus: `python tests/data/make_bad.py [DIR]` (default tests/data/bad).

DIR/images/<class>/ holds one good image per class plus every kind of bad file; the
expected outcome of each is in EXPECTED (None = used, otherwise the excluded reason's key).
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# file name (under images/) -> substring of the reason it is excluded for, or None if it is used
EXPECTED = {
    "cats/zero_bytes.jpg": "cannot decode",
    "cats/truncated.jpg": "cannot decode",
    "cats/png_named.jpg": None,
    "cats/text_named.jpg": "cannot decode",
    "cats/cmyk.jpg": None,
    "cats/deep16.png": None,
    "cats/palette_alpha.png": None,
    "cats/one_pixel.png": None,
    "cats/bomb.png": "decompression bomb",
    "cats/exif_rotated.jpg": None,
    "dogs/ünïcødé näme 1.png": None,
    "dogs/loop_a.jpg": "not a regular file",
    "dogs/loop_b.jpg": "not a regular file",
    "dogs/good_dog.png": None,
    "cats/good_cat.png": None,
}


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (no real pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_bad(root: str | os.PathLike[str]) -> Path:
    root = Path(root)
    img = root / "images"
    for cls in ("cats", "dogs"):
        (img / cls).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    photo.save(img / "cats" / "good_cat.png")
    photo.transpose(Image.FLIP_LEFT_RIGHT).save(img / "dogs" / "good_dog.png")
    (img / "cats" / "zero_bytes.jpg").write_bytes(b"")
    photo.save(img / "cats" / "full.jpg", quality=90)
    data = (img / "cats" / "full.jpg").read_bytes()
    (img / "cats" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (img / "cats" / "full.jpg").unlink()
    photo.save(img / "cats" / "png_named.jpg", format="PNG")
    (img / "cats" / "text_named.jpg").write_text("this is not an image\n")
    photo.convert("CMYK").save(img / "cats" / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(img / "cats" / "deep16.png")
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(img / "cats" / "palette_alpha.png", transparency=0)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(img / "cats" / "one_pixel.png")
    _png_header_only(img / "cats" / "bomb.png", 60000, 60000)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(img / "cats" / "exif_rotated.jpg", exif=exif)
    photo.save(img / "dogs" / "ünïcødé näme 1.png")
    a, b = img / "dogs" / "loop_a.jpg", img / "dogs" / "loop_b.jpg"
    for link, target in ((a, b.name), (b, a.name)):
        if not link.is_symlink():
            link.symlink_to(target)
    loop_dir = img / "dogs" / "subdir"
    loop_dir.mkdir(exist_ok=True)
    if not (loop_dir / "up").is_symlink():
        (loop_dir / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    empty = root / "with_empty_class"
    (empty / "cats").mkdir(parents=True, exist_ok=True)
    (empty / "empty").mkdir(exist_ok=True)
    photo.save(empty / "cats" / "c.png")
    csv_rows = ["path,label,split", "images/cats/good_cat.png,cats,train", "images/dogs/good_dog.png,dogs,train",
                "images/cats/png_named.jpg,cats,valid", "images/dogs/ünïcødé näme 1.png,dogs,valid",
                "images/cats/missing.png,cats,train", "../../etc/passwd,cats,train",
                "images/cats/cmyk.jpg,wolves,valid"]
    (root / "labels.csv").write_text("\n".join(csv_rows) + "\n", encoding="utf-8")
    return root


if __name__ == "__main__":
    print(make_bad(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "bad"))
