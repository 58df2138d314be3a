"""Test-time augmentation averages each image's views in logit space, whether the model is the
run (logits out) or an exported file (probabilities, real units out: `outputs_mapped`)."""

from __future__ import annotations

import pytest
import torch

from visiontune.tasks.catalog import make_task

SHAPES = [("single-label", ["a", "b", "c"], {}), ("multi-label", ["a", "b", "c"], {}),
          ("regression", ["y"], {"target_mean": 2.0, "target_std": 3.0}),
          ("regression", ["y"], {"target_mean": 2.0, "target_std": 3.0, "target_range": [0.0, 10.0]})]


@pytest.mark.parametrize("name,classes,meta", SHAPES)
def test_an_exported_file_averages_its_views_as_the_run_does(name: str, classes: list[str], meta: dict) -> None:
    """Averaging an export's probabilities instead of the logits gave other answers with
    --tta (and predict picks ONNX by itself for 2,000 images or more)."""
    run = make_task(name, classes, meta)
    exported = make_task(name, classes, {**run.metadata(), "outputs_mapped": True,  # as export writes it
                                         "outputs": run.exported_outputs})
    assert exported.outputs_mapped and not run.outputs_mapped
    logits = torch.randn(5, 4, run.num_outputs, generator=torch.Generator().manual_seed(0)) * 4
    as_run = run.probabilities(run.average_views(logits))
    file_outputs = run.export_module()(logits.flatten(0, 1)).view_as(logits)  # what the exported graph gives per view
    as_file = exported.probabilities(exported.average_views(file_outputs))
    assert torch.allclose(as_file, as_run, atol=1e-5)
