"""`visiontune demo`: a bad option is refused before the demo writes its 200 images."""

from __future__ import annotations

from pathlib import Path

import pytest

from visiontune.demo import run_demo
from visiontune.errors import ConfigError


def test_a_bad_option_is_refused_before_any_image_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epochs"):
        run_demo(str(tmp_path / "demo"), "gradual", 0, 64)
    assert not (tmp_path / "demo").exists()  # it wrote 200 images, then refused
