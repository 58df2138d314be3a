"""Look inside an nn.Module: the module tree, parameters, requires_grad and learning rates.

This is the `named_modules` / `named_parameters` / optimizer `param_groups` view, printed
for a model prepared by a strategy exactly as `fit` prepares it.
"""

from __future__ import annotations

from torch import nn

from visiontune.config import RunConfig
from visiontune.models.classifier import Classifier
from visiontune.train.plan import apply_phase, build_optimizer, count_parameters, make_plan
from visiontune.train.strategies import get_strategy


def module_tree(model: nn.Module, depth: int = 2) -> list[str]:
    """One line per module down to `depth`: name, type, parameters (trainable)."""
    lines = []
    for name, module in model.named_modules():
        level = 0 if not name else name.count(".") + 1
        if level > depth:
            continue
        total, trainable = count_parameters(module), count_parameters(module, trainable_only=True)
        label = name or "(model)"
        lines.append(f"{'  ' * level}{label:<{max(1, 40 - 2 * level)}} {type(module).__name__:<24} {total:>12,} {trainable:>12,}")
    return [f"{'module':<40} {'type':<24} {'params':>12} {'trainable':>12}"] + lines


def parameter_table(model: nn.Module, lr_of: dict[int, float]) -> list[str]:
    """`named_parameters()` with shape, size, requires_grad and the LR its group runs at;
    then what `state_dict()` holds beyond parameters (BatchNorm running statistics...)."""
    lines = [f"{'parameter':<52} {'shape':<20} {'numel':>10}  {'requires_grad':<13} {'lr':>8}"]
    for name, p in model.named_parameters():
        lines.append(f"{name:<52} {str(tuple(p.shape)):<20} {p.numel():>10,}  {str(p.requires_grad):<13} "
                     f"{lr_of.get(id(p), 0.0):>8.3g}")
    state = model.state_dict()
    n_params = sum(1 for _ in model.parameters())
    buffers = [k for k in state if k not in dict(model.named_parameters())]
    lines.append(f"state_dict: {len(state)} entries = {n_params} parameters + {len(buffers)} buffers "
                 f"(e.g. {', '.join(buffers[:2]) or 'none'})")
    return lines


def describe(model: Classifier, cfg: RunConfig, depth: int = 2, parameters: bool = False) -> str:
    plan = make_plan(model, cfg.strategy, cfg.train)
    optimizer = build_optimizer(model, plan, cfg.train)
    out = [f"strategy: {cfg.strategy.name} ({get_strategy(cfg.strategy.name).description})",
           f"optimizer: {cfg.train.optimizer}   "
           f"lr (head peak): {cfg.train.resolved_lr():g}   weight decay: {cfg.train.resolved_weight_decay():g}"]
    for index, phase in enumerate(plan.phases):
        apply_phase(model, optimizer, plan, index)
        n_train, n_all = plan.trainable_params(index), count_parameters(model)
        out += ["", f"== phase {index + 1}/{len(plan.phases)}: {phase.name}, {phase.epochs} epoch(s); "
                f"trainable {n_train:,} of {n_all:,} parameters ({100 * n_train / max(1, n_all):.1f}%)"]
        out.append(f"{'#':>3} {'layer group':<32} {'params':>12}  {'requires_grad':<13} {'peak lr':>10}")
        for gi, group in enumerate(plan.groups):
            out.append(f"{gi:>3} {group.name:<32} {group.num_params:>12,}  {str(phase.trainable[gi]):<13} "
                       f"{phase.lrs[gi]:>10.3g}")
        out.append("")
        out.append(f"optimizer param_groups ({len(optimizer.param_groups)}):")
        for pg in optimizer.param_groups:
            n = sum(p.numel() for p in pg["params"])
            out.append(f"    {pg['name']:<40} tensors {len(pg['params']):>4}  params {n:>12,}  "
                       f"lr {pg['lr']:.3g}  weight_decay {pg['weight_decay']:g}")
        if index == 0:
            out += ["", "module tree (phase 1):", *module_tree(model, depth)]
            if parameters:
                lr_of = {id(p): pg["lr"] for pg in optimizer.param_groups for p in pg["params"]}
                out += ["", "named_parameters (phase 1):", *parameter_table(model, lr_of)]
    return "\n".join(out)
