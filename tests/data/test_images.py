from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.data.images import check_image, load_rgb


def test_grey_cmyk_palette_rgba_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    for name in ("grey.png", "cmyk.jpg", "pal.png", "clear.png"):
        im = load_rgb(tmp_path / name)
        assert im.mode == "RGB" and im.size == (8, 8), name
    assert load_rgb(tmp_path / "grey.png").getpixel((0, 0)) == (77, 77, 77)
    assert load_rgb(tmp_path / "pal.png").getpixel((0, 0)) == (10, 200, 30)
    assert max(abs(a - 255) for a in load_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0))) <= 2  # no ink = white
    assert load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "t.png", transparency=0)
    im = load_rgb(tmp_path / "t.png")
    assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((1, 1)) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    im = load_rgb(tmp_path / "deep.png")
    assert [im.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1))] == [0, 128, 255]


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (10, 30)


def test_check_image_reports_reasons(tmp_path: Path) -> None:
    Image.new("RGB", (5, 5)).save(tmp_path / "ok.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    Image.new("RGB", (5, 5)).save(tmp_path / "png_named.jpg", format="PNG")
    assert check_image(tmp_path / "ok.png") is None
    assert check_image(tmp_path / "png_named.jpg") is None  # content decides, not the extension
    assert "decode" in check_image(tmp_path / "zero.jpg")
    assert "decode" in check_image(tmp_path / "text.jpg")
