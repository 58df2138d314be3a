"""Sharing in timm's Hugging Face Hub layout.

    visiontune export runs/<run> --format timm --output DIR   # DIR/config.json + DIR/model.safetensors
    visiontune push runs/<run> user/my-model                   # the same folder, uploaded with huggingface_hub

The folder is written by timm itself (`timm.models.save_for_hf`), with a model card
(`README.md`, huggingface_hub's ModelCard: task, labels, images per split, validation
metrics, recipe, intended use and limits): `config.json` holds the
architecture, num_classes, label_names and a pretrained_cfg with this run's mean, std,
input size, interpolation and crop; `model.safetensors` the backbone with the fine-tuned
head as timm's own classifier. So anyone can load it without visiontune:

    model = timm.create_model("local-dir:DIR", pretrained=True)     # or "hf-hub:user/my-model"

and visiontune can start from it (`--weights local-dir:DIR`). visiontune's own metadata
(task, thresholds of a multi-label run, version) rides along under "visiontune" in
config.json, with `outputs`: what the model's outputs are (`Task.linear_output`):
classification's logits; a regression's numbers in real units (the target scaling folded
into the classifier); with `--target-range`, z, and the prediction is
low + (high - low) * sigmoid(z) (a sigmoid does not fold into a linear layer). Needs a
timm backbone and a linear head (the default, `--head-hidden 0`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune.bundle import Bundle, load_bundle
from visiontune.errors import ConfigError, VisiontuneError, WeightsUnavailableError
from visiontune.models.backbones import BuildSpec, _timm_kwargs, parse_backbone
from visiontune.models.weights import hub_reachable
from visiontune.rundir import RunDir
from visiontune.version import __version__

PARITY_TOLERANCE = 1e-4


def timm_model_of(bundle: Bundle) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The run's classifier as one plain timm model (backbone + its classifier = our head,
    with what of the task's output scaling a linear layer holds: `Task.linear_output`), the
    rest of the scaling (a module) and what the outputs are (for config.json)."""
    import timm

    backbone = bundle.config.model.backbone if bundle.config else ""
    source, arch = parse_backbone(backbone)
    if source != "timm" or not backbone:
        raise ConfigError(f"the timm format needs a timm backbone; this run uses {backbone or 'an unknown one'!r}: "
                          "export --format onnx instead")
    linears = [m for m in bundle.model.head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ConfigError("the timm format needs a linear head; this run's head has a hidden layer "
                          "(--head-hidden): export --format onnx instead")
    size = bundle.preprocess.input_size
    model = timm.create_model(arch, pretrained=False, num_classes=bundle.task.num_outputs,
                              **_timm_kwargs(BuildSpec(arch, "none", size)))
    missing, unexpected = model.load_state_dict(bundle.model.backbone.state_dict(), strict=False)
    classifier = model.get_classifier()
    expected = {n for n, p in model.named_parameters() if any(p is q for q in classifier.parameters())}
    if unexpected or set(missing) - expected:
        raise VisiontuneError(f"the backbone's weights do not fit timm's {arch}: missing "
                              f"{sorted(set(missing) - expected)[:5]}, unexpected {unexpected[:5]}")
    cal = bundle.model.calibration  # z * scale + bias, folded into the linear layer
    weight, bias, rest, described = bundle.task.linear_output(linears[0].weight.detach() * cal.scale[:, None],
                                                              linears[0].bias.detach() * cal.scale + cal.bias)
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    return model.eval(), rest.eval(), described


def export_timm(run: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> tuple[Path, float]:
    """Write the folder; return it and max |run's outputs - timm's| on random inputs (the
    task's outputs as export writes them: logits, numbers in real units), relative to their
    size for numbers."""
    from timm.models import save_for_hf

    bundle = load_bundle(run)
    model, rest, described = timm_model_of(bundle)
    pre = bundle.preprocess
    x = torch.randn(3, 3, pre.input_size, pre.input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = bundle.task.output_module().eval()(bundle.model.eval()(x))
        diff = float((rest(model(x)) - expected).abs().max() / max(1.0, float(expected.abs().max())))
    if diff > PARITY_TOLERANCE:
        raise VisiontuneError(f"the timm model differs from the run's by {diff:.2e} (> {PARITY_TOLERANCE})")
    out = Path(output) if output else RunDir(bundle.path).timm_folder
    data_config = {"input_size": (3, pre.input_size, pre.input_size), "mean": tuple(pre.mean), "std": tuple(pre.std),
                   "interpolation": pre.interpolation, "crop_pct": pre.crop_pct}
    meta = {**bundle.task.metadata(), **described, "version": __version__, "classes": bundle.task.classes}
    save_for_hf(model, str(out), model_config={"label_names": list(bundle.task.classes), "visiontune": meta},
                safe_serialization=True, data_config=data_config)
    write_model_card(bundle, out, described["outputs"])
    return out, diff


def write_model_card(bundle: Bundle, out: Path, outputs: str = "logits") -> Path:
    """`out/README.md`, a Hugging Face model card (huggingface_hub.ModelCard): task and
    labels, what the model outputs, images per split, the validation metrics of the
    weights kept, the recipe, intended use and limits, and how to load it. From the run's
    own files."""
    from collections import Counter

    from huggingface_hub import ModelCard

    run = Path(bundle.path)
    cfg = bundle.config
    task = bundle.task
    splits = Counter(row["split"] for row in RunDir(run).split_rows())
    metrics = RunDir(run).read_metrics()
    shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
    labels = f"{task.wording.summary_head(task.classes)} ({', '.join(task.classes)})"
    recipe = (f"backbone `{cfg.model.backbone}` ({cfg.model.weights} weights), strategy `{cfg.strategy.name}`, "
              f"{metrics.get('epochs_run', cfg.train.epochs)} epochs run (best: {metrics.get('best_epoch', '?')}), "
              f"{cfg.model.image_size or bundle.preprocess.input_size} px, augmentation `{cfg.augmentation.augment}`, "
              f"lr {cfg.train.lr}, seed {cfg.seed}") if cfg is not None else "unknown (no config.yaml in the run)"
    lines = [
        "---", "library_name: timm", "tags:", f"- {task.wording.card_tag}", "- timm", "- visiontune", "---", "",
        f"# {run.name}", "",
        f"A {task.name} model fine-tuned with visiontune {__version__}.", "",
        f"- **Task**: {task.name}; outputs: {labels}",
        f"- **Model outputs**: {outputs} (config.json: the \"visiontune\" section's \"outputs\")",
        "- **Data**: " + (", ".join(f"{n} {split} images" for split, n in sorted(splits.items())) or "not recorded"),
        "- **Validation metrics** (the validation split of the run; the weights kept are the best epoch's): "
        + (", ".join(f"{k} {v:.4f}" for k, v in shown.items()) or "none recorded"),
        f"- **Recipe**: {recipe}",
        f"- **Preprocessing**: {bundle.preprocess.input_size} px, mean {list(bundle.preprocess.mean)}, std "
        f"{list(bundle.preprocess.std)}, {bundle.preprocess.interpolation} resize, crop {bundle.preprocess.crop_pct}",
        "", "## Intended use and limits", "",
        "For images like the training data: the metrics above hold for images drawn the way the validation split "
        "was, not for other cameras, sites or label definitions. They come from a validation split that also chose "
        "the best epoch (slightly optimistic); a held-out test set is the honest measure. Check the data's label "
        "noise and duplicates (`visiontune interpret`) before trusting small differences.",
        "", "## Use", "", "```python", "import timm", "",
        'model = timm.create_model("hf-hub:USER/NAME", pretrained=True)  # or "local-dir:THIS_FOLDER"',
        "```", "",
    ]
    card = ModelCard("\n".join(lines))
    card.save(out / "README.md")
    return out / "README.md"


def push(run: str | os.PathLike[str], repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Export the run in timm's layout and upload it to the Hub repository `repo_id`; the URL.
    Offline: a WeightsUnavailableError at once, before anything is written."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or not hub_reachable("huggingface.co"):
        raise WeightsUnavailableError(
            f"cannot push to the Hugging Face Hub: huggingface.co is not reachable from this machine (or "
            f"HF_HUB_OFFLINE is set). Nothing was uploaded. Export the folder now and upload it later:\n"
            f"  visiontune export {run} --format timm --output model-dir\n"
            f"  hf upload {repo_id} model-dir")
    from huggingface_hub import HfApi

    folder, _ = export_timm(run)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload from visiontune")
    return str(getattr(commit, "repo_url", f"https://huggingface.co/{repo_id}"))

