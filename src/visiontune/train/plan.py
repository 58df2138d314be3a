"""The plan of a run: the model's layer groups, the strategy's phases over them, and the
optimizer's parameter groups.

Optimizer parameter groups are created once (per layer group, split into decay / no
decay for 1-D parameters); a phase change only flips `requires_grad` and the groups' peak
LRs. Frozen parameters get no gradient, so no optimizer step touches them. What each
strategy trains is in strategies.py (the registry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from visiontune.config import StrategyConfig, TrainConfig
from visiontune.models.classifier import Classifier, backbone_groups
from visiontune.train.strategies import LayerGroup, Phase, StrategyContext, get_strategy


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

    def trainable_params(self, index: int) -> int:
        """Parameters that train in phase `index`."""
        phase = self.phases[index]
        return sum(g.num_params for g, on in zip(self.groups, phase.trainable) if on)

    def most_trainable_params(self) -> int:
        return max(self.trainable_params(i) for i in range(len(self.phases)))


def layer_groups(model: Classifier, fine: bool = False) -> list[LayerGroup]:
    params = dict(model.named_parameters())
    groups = [
        LayerGroup(name, tuple(names), sum(params[n].numel() for n in names))
        for name, names in backbone_groups(model, fine)
    ]
    covered = {n for g in groups for n in g.param_names}
    head = tuple(n for n in params if n.startswith("head."))
    stray = [n for n in params if n not in covered and n not in head]
    if stray:  # parameters the matcher did not place: keep them trainable with the last group
        last = groups[-1]
        groups[-1] = LayerGroup(last.name, last.param_names + tuple(stray), last.num_params + sum(params[n].numel() for n in stray))
    groups.append(LayerGroup("head", head, sum(params[n].numel() for n in head), is_head=True))
    return groups


def make_plan(model: Classifier, s: StrategyConfig, t: TrainConfig, converged_probe: bool = False,
              keeps_bn_statistics: bool = True) -> Plan:
    """The registered strategy `s.name` applied to this model's layer groups; with
    `converged_probe`, its head-only phases become one converged-probe pass each, unless
    a later phase trains BatchNorm statistics (`keeps_bn_statistics` False): the probe is
    fitted on eval-mode features, which batch statistics would change under it."""
    groups = tuple(layer_groups(model, fine=s.layer_decay is not None))
    phases = get_strategy(s.name).phases(StrategyContext(groups, t.epochs, t.resolved_lr(), s))
    if converged_probe and (keeps_bn_statistics or all(p.head_only() for p in phases)):
        phases = [p.as_probe() if p.head_only() else p for p in phases]
    return Plan(s.name, groups, tuple(phases))


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


def set_train_modes(model: nn.Module, frozen_bn: str, trainable_bn: str) -> None:
    """After `model.train()`: every module whose parameters are all frozen goes to eval
    mode with everything inside it (dropout and stochastic depth too), so a frozen part
    computes the same function as when its features are cached; then BatchNorm layers
    follow the options: frozen ones train their statistics only with
    `frozen_bn == 'train'`, training ones keep theirs with `trainable_bn == 'eval'`.
    Parameter-free modules (dropout) follow the nearest module above them that has
    parameters."""
    for module in model.modules():
        ps = list(module.parameters())
        if ps and not any(p.requires_grad for p in ps):
            module.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            ps = list(module.parameters(recurse=False))
            frozen = bool(ps) and not any(p.requires_grad for p in ps)
            module.train(frozen_bn == "train" if frozen else trainable_bn == "train")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of `model` (only those with requires_grad when `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
