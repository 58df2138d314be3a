"""The strategy registry: WHAT trains in each phase, and at which peak learning rate.

A strategy is one function decorated with `@register_strategy(name, description)` that
receives a `StrategyContext` (the model's layer groups, input side first and the head
last; the epoch budget; the head's peak LR and the strategy options) and returns its
phases. Config validation, `--help`, `inspect`, `compare` and the advisor all read this
registry, so adding a strategy is one function here (or anywhere, before the run).

This module imports no torch: the CLI reads it to build `--help`.

Built-ins (the peak learning rate `lr` is the head's; the backbone gets
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from visiontune.errors import ConfigError
from visiontune.registry import Registry

AUTO = "auto"  # not a strategy: ask the advisor to pick one (planning/plan.resolve_strategy)


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
    probe: bool = False  # head only, fitted to convergence in one pass (frozen/probe.py)

    def head_only(self) -> bool:
        return self.trainable[-1] and not any(self.trainable[:-1])

    def as_probe(self) -> Phase:
        """This head-only phase as one converged-probe pass (a 0-epoch phase stays empty)."""
        return replace(self, name=f"{self.name} (converged probe)", epochs=min(self.epochs, 1), probe=True)


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy function sees: the layer groups (head last), the total epochs, the
    head's peak LR and the run's StrategyConfig (`options`)."""

    groups: tuple[LayerGroup, ...]
    epochs: int
    lr: float
    options: Any

    @property
    def n_body(self) -> int:
        return len(self.groups) - 1

    @property
    def body_lr(self) -> float:
        return self.lr / self.options.head_lr_mult

    def head_only(self, epochs: int, name: str = "head only") -> Phase:
        return Phase(name, epochs, tuple(g.is_head for g in self.groups),
                     tuple(self.lr if g.is_head else 0.0 for g in self.groups))

    def decayed(self, scale: float = 1.0) -> list[float] | None:
        """Layer-wise LR decay (options.layer_decay): body group i of n at
        lr x scale x decay^(n - i), the head at lr x scale; None without it."""
        decay = getattr(self.options, "layer_decay", None)
        if decay is None:
            return None
        return [self.lr * scale * decay ** (self.n_body - i) for i in range(self.n_body)]

    def everything(self, name: str, epochs: int, body_lrs: list[float], head_lr: float) -> Phase:
        return Phase(name, epochs, tuple(True for _ in self.groups), tuple([*body_lrs, head_lr]))


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str  # one line: what trains (shown by --help, inspect, compare, the advisor)
    phases: Callable[[StrategyContext], list[Phase]]
    random_init: bool = False  # trains from random weights: --weights pretrained becomes none
    check: Callable[[Any], str | None] | None = None  # RunConfig -> why it cannot run, or None


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register_strategy(name: str, description: str, *, random_init: bool = False,
                      check: Callable[[Any], str | None] | None = None
                      ) -> Callable[[Callable[[StrategyContext], list[Phase]]], Callable[[StrategyContext], list[Phase]]]:
    """Decorator: add the decorated phases function to the registry as `name`."""
    if name == AUTO:
        raise ConfigError(f"{AUTO!r} is reserved for the advisor's choice")

    def add(fn: Callable[[StrategyContext], list[Phase]]) -> Callable[[StrategyContext], list[Phase]]:
        STRATEGIES.add(name, Strategy(name, description, fn, random_init, check))
        return fn

    return add


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.find(name)


def strategy_names() -> tuple[str, ...]:
    return STRATEGIES.names()


def strategy_choices() -> tuple[str, ...]:
    """Every value `--strategy` accepts: the registered strategies and 'auto'."""
    return (*STRATEGIES, AUTO)


def describe_strategies(width: int = 16) -> str:
    """One line per strategy (the `--help` epilog)."""
    lines = [f"  {s.name:<{width}} {s.description}" for s in STRATEGIES.values()]
    lines.append(f"  {AUTO:<{width}} measure data size and task similarity, pick one of the above (visiontune advise)")
    return "\n".join(lines)


# -- built-in strategies ------------------------------------------------------------------
@register_strategy("feature-extract", "backbone frozen, only the new head trains (small data, ImageNet-like task)")
def feature_extract(ctx: StrategyContext) -> list[Phase]:
    return [ctx.head_only(ctx.epochs)]


@register_strategy("finetune", "everything trains; head LR = head_lr_mult x backbone LR (default 10x)")
def finetune(ctx: StrategyContext) -> list[Phase]:
    return [ctx.everything("all", ctx.epochs, ctx.decayed() or [ctx.body_lr] * ctx.n_body, ctx.lr)]


@register_strategy("freeze-k", "first --freeze K backbone layer groups frozen, the rest fine-tunes")
def freeze_k(ctx: StrategyContext) -> list[Phase]:
    k = ctx.n_body // 2 if ctx.options.freeze is None else ctx.options.freeze
    if k > ctx.n_body:
        raise ConfigError(
            f"--freeze {k} exceeds the {ctx.n_body} layer groups of this backbone "
            f"({', '.join(g.name for g in ctx.groups[:-1])}); use 0..{ctx.n_body}"
        )
    on = tuple(i >= k for i in range(len(ctx.groups)))
    body = ctx.decayed() or [ctx.body_lr] * ctx.n_body
    lrs = tuple(0.0 if not on[i] else (ctx.lr if g.is_head else body[i]) for i, g in enumerate(ctx.groups))
    return [Phase(f"first {k} groups frozen", ctx.epochs, on, lrs)]


def _gradual_check(cfg: Any) -> str | None:
    s, epochs = cfg.strategy, cfg.train.epochs
    if epochs <= s.freeze_epochs:
        return (f"strategy 'gradual' trains the head for freeze_epochs={s.freeze_epochs} and then"
                f" the whole model, so epochs must exceed it (got epochs={epochs});"
                " raise --epochs or lower --freeze-epochs")
    return None


@register_strategy("gradual", "fastai fine_tune: --freeze-epochs head-only, then all with discriminative LRs",
                   check=_gradual_check)
def gradual(ctx: StrategyContext) -> list[Phase]:
    o, n = ctx.options, ctx.n_body
    scale = o.unfreeze_lr_scale
    body = [ctx.body_lr * scale / o.layer_lr_ratio ** (1 - i / max(1, n - 1)) for i in range(n)]
    if n == 1:
        body = [ctx.body_lr * scale]
    body = ctx.decayed(scale) or body
    return [ctx.head_only(o.freeze_epochs),
            ctx.everything("all, discriminative LRs", ctx.epochs - o.freeze_epochs, body, ctx.lr * scale)]


def _scratch_check(cfg: Any) -> str | None:
    if cfg.model.weights not in ("none", "pretrained"):
        return (f"strategy 'scratch' trains from random initialisation; drop --weights {cfg.model.weights!r} "
                "or pick another strategy")
    return None


@register_strategy("scratch", "random init, same harness: what pretraining buys", random_init=True,
                   check=_scratch_check)
def scratch(ctx: StrategyContext) -> list[Phase]:
    return [ctx.everything("all (random init)", ctx.epochs, [ctx.lr] * ctx.n_body, ctx.lr)]
