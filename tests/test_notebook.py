"""The quickstart notebook runs top to bottom in a real Jupyter kernel, and its cells show
what they claim: a figure from show_batch, HTML tables from fit and evaluate, figures from
interpret. Also the results' HTML on their own."""

from __future__ import annotations

from pathlib import Path

import pytest

import visiontune as vt
from conftest import TINY

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _outputs(cell) -> dict[str, str]:
    found: dict[str, str] = {}
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            raise AssertionError(f"cell failed: {out.get('ename')}: {out.get('evalue')}")
        for kind, value in out.get("data", {}).items():
            found[kind] = found.get(kind, "") + (value if isinstance(value, str) else "".join(value))
    return found


def test_quickstart_notebook_executes_and_shows_tables_and_figures(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the suite's warning policy (pyproject.toml) inside the kernel too: a deprecated call in
    # the notebook's path fails its cell
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        "import warnings\n"
        "warnings.filterwarnings('error', category=DeprecationWarning, module='visiontune|torch|torchvision|PIL')\n"
        "warnings.filterwarnings('error', category=FutureWarning)"))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = [o.get("text", "") for c in code for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not [t for t in printed if "Warning" in t], printed
    by_source = {c.source.splitlines()[-1]: _outputs(c) for c in code}
    assert "image/png" in by_source['vt.show_batch(root, n=8, image_size=96)']
    fit = by_source["result"]["text/html"]
    assert "<table" in fit and "history" in fit and "accuracy" in fit
    assert "per class" in by_source['vt.evaluate(result.run_dir, root / "test")']["text/html"]
    shown = by_source["vt.interpret(result.run_dir)"]["text/html"]
    assert shown.count("<img src='data:image/png;base64,") >= 3
    assert (tmp_path / "quickstart-runs").is_dir()


def test_results_render_as_html_tables(flat_data: Path, tmp_path: Path) -> None:
    r = vt.fit(flat_data, **dict(TINY, strategy="feature-extract", epochs=2), output=str(tmp_path / "runs"))
    html = r._repr_html_()
    assert html.count("<tr>") == 1 + len(r.metrics) + 1 + len(r.history) and "best epoch" in html
    ev = vt.evaluate(r.run_dir, flat_data)._repr_html_()
    assert "<td>red</td>" in ev and "<td>green</td>" in ev
    rows, _ = vt.compare(flat_data, strategies=("feature-extract", "finetune"),
                         **dict(TINY, strategy="finetune", epochs=1), output=str(tmp_path / "cmp"))
    table = rows._repr_html_()
    assert "<td>feature-extract</td>" in table and "<td>finetune</td>" in table
    cv = vt.cross_validate(flat_data, folds=2, **dict(TINY, strategy="feature-extract", epochs=1),
                           output=str(tmp_path / "cv"))._repr_html_()
    assert "fold 2" in cv and "mean +- std" in cv


def test_show_batch_draws_n_augmented_images_with_their_labels(flat_data: Path) -> None:
    fig = vt.show_batch(flat_data, n=6, cols=3, image_size=32, augment="medium")
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 6 and {ax.get_title() for ax in titled} <= {"red", "green"}
    assert all(ax.images[0].get_array().shape == (32, 32, 3) for ax in titled)
