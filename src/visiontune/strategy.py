"""WHAT trains and at which learning rate: layer groups, phases, optimizer groups.

Strategies (the peak learning rate `lr` is the head's; the backbone gets
`lr / head_lr_mult`):

- feature-extract: backbone frozen, only the new head trains. Small data, task close to
  ImageNet; cheapest.
- finetune: everything trains from the start, backbone at lr/head_lr_mult (d2l 14.2: the
  new layer learns 10x faster). Enough data, or a task far from ImageNet.
- freeze-k: the first `freeze` backbone layer groups stay frozen (generic low-level
  filters), the rest fine-tunes. Medium data; fewer trainable parameters.
- gradual: fastai's `fine_tune`: `freeze_epochs` head-only epochs, then all groups unfreeze
  with discriminative LRs (geometric from the first to the last backbone group, ratio
  `layer_lr_ratio`) at `unfreeze_lr_scale` x the LR. The robust default.
- scratch: random initialisation, everything at `lr`; the baseline that shows what
  pretraining buys.

Optimizer parameter groups are created once (per layer group, split into decay / no
decay for 1-D parameters); a phase change only flips `requires_grad` and the groups' peak
LRs. Frozen parameters get no gradient, so no optimizer step touches them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from visiontune.config import StrategyConfig, TrainConfig
from visiontune.errors import ConfigError
from visiontune.models import Classifier, backbone_groups


@dataclass(frozen=True)
class LayerGroup:
    name: str
    param_names: tuple[str, ...]
    num_params: int
    is_head: bool = False


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    trainable: tuple[bool, ...]  # one per layer group
    lrs: tuple[float, ...]  # peak LR per layer group (0 where frozen)


@dataclass(frozen=True)
class Plan:
    strategy: str
    groups: tuple[LayerGroup, ...]
    phases: tuple[Phase, ...]

    def phase_index(self, epoch: int) -> int:
        """Index of the phase that epoch `epoch` (0-based) belongs to."""
        start = 0
        for i, phase in enumerate(self.phases):
            if epoch < start + phase.epochs:
                return i
            start += phase.epochs
        return len(self.phases) - 1

    def phase_start(self, index: int) -> int:
        return sum(p.epochs for p in self.phases[:index])


def layer_groups(model: Classifier) -> list[LayerGroup]:
    params = dict(model.named_parameters())
    groups = [
        LayerGroup(name, tuple(names), sum(params[n].numel() for n in names))
        for name, names in backbone_groups(model)
    ]
    covered = {n for g in groups for n in g.param_names}
    head = tuple(n for n in params if n.startswith("head."))
    stray = [n for n in params if n not in covered and n not in head]
    if stray:  # parameters the matcher did not place: keep them trainable with the last group
        last = groups[-1]
        groups[-1] = LayerGroup(last.name, last.param_names + tuple(stray), last.num_params + sum(params[n].numel() for n in stray))
    groups.append(LayerGroup("head", head, sum(params[n].numel() for n in head), is_head=True))
    return groups


def make_plan(model: Classifier, s: StrategyConfig, t: TrainConfig) -> Plan:
    groups = layer_groups(model)
    n_body = len(groups) - 1
    lr = t.resolved_lr()
    body_lr = lr / s.head_lr_mult
    head_only = tuple(g.is_head for g in groups)
    head_only_lrs = tuple(lr if g.is_head else 0.0 for g in groups)
    all_on = tuple(True for _ in groups)
    if s.name == "feature-extract":
        phases = [Phase("head only", t.epochs, head_only, head_only_lrs)]
    elif s.name == "finetune":
        phases = [Phase("all", t.epochs, all_on, tuple([body_lr] * n_body + [lr]))]
    elif s.name == "scratch":
        phases = [Phase("all (random init)", t.epochs, all_on, tuple([lr] * len(groups)))]
    elif s.name == "freeze-k":
        k = n_body // 2 if s.freeze is None else s.freeze
        if k > n_body:
            raise ConfigError(
                f"--freeze {k} exceeds the {n_body} layer groups of this backbone "
                f"({', '.join(g.name for g in groups[:-1])}); use 0..{n_body}"
            )
        on = tuple(i >= k for i in range(len(groups)))
        lrs = tuple(0.0 if not on[i] else (lr if g.is_head else body_lr) for i, g in enumerate(groups))
        phases = [Phase(f"first {k} groups frozen", t.epochs, on, lrs)]
    elif s.name == "gradual":
        scale = s.unfreeze_lr_scale
        body = [body_lr * scale / s.layer_lr_ratio ** (1 - i / max(1, n_body - 1)) for i in range(n_body)]
        if n_body == 1:
            body = [body_lr * scale]
        phases = [
            Phase("head only", s.freeze_epochs, head_only, head_only_lrs),
            Phase("all, discriminative LRs", t.epochs - s.freeze_epochs, all_on, tuple(body + [lr * scale])),
        ]
    else:  # validated in RunConfig; kept for direct callers
        raise ConfigError(f"unknown strategy {s.name!r}")
    return Plan(s.name, tuple(groups), tuple(phases))


def build_optimizer(model: Classifier, plan: Plan, t: TrainConfig) -> torch.optim.Optimizer:
    """One optimizer over every parameter, grouped by layer group and decay; built once."""
    params = dict(model.named_parameters())
    wd = t.resolved_weight_decay()
    param_groups = []
    for gi, group in enumerate(plan.groups):
        decay = [params[n] for n in group.param_names if params[n].ndim > 1]
        no_decay = [params[n] for n in group.param_names if params[n].ndim <= 1]
        for suffix, plist, weight_decay in (("", decay, wd), (" (no decay)", no_decay, 0.0)):
            if plist:
                param_groups.append(
                    {"params": plist, "weight_decay": weight_decay, "lr": 0.0, "peak_lr": 0.0,
                     "layer_group": gi, "name": group.name + suffix}
                )
    if t.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=t.resolved_lr(), momentum=t.momentum, nesterov=t.momentum > 0)
    return torch.optim.AdamW(param_groups, lr=t.resolved_lr())


def apply_phase(model: Classifier, optimizer: torch.optim.Optimizer, plan: Plan, index: int) -> None:
    """Flip requires_grad and set each optimizer group's peak LR for phase `index`."""
    phase = plan.phases[index]
    params = dict(model.named_parameters())
    for gi, group in enumerate(plan.groups):
        for name in group.param_names:
            params[name].requires_grad_(phase.trainable[gi])
    for pg in optimizer.param_groups:
        pg["peak_lr"] = phase.lrs[pg["layer_group"]]
        pg["lr"] = pg["peak_lr"]


def set_batchnorm_modes(model: nn.Module, frozen_bn: str, trainable_bn: str) -> None:
    """After `model.train()`: put BatchNorm layers in eval mode (running statistics used and
    kept) when their group is frozen and `frozen_bn == 'eval'`, or trains and
    `trainable_bn == 'eval'`. Their affine weights still train when their group does."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            ps = list(module.parameters(recurse=False))
            frozen = bool(ps) and not any(p.requires_grad for p in ps)
            if (frozen and frozen_bn == "eval") or (not frozen and trainable_bn == "eval"):
                module.eval()


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
