"""Warm-start head rows from the source classifier (d2l 14.2, exercise 4).

When a target class name is an ImageNet class name or one of its WordNet synonyms
(ImageNet's class descriptions are the synsets' lemmas, e.g. 934 = "hotdog, hot dog, red
hot"), that row of the new head starts as the pretrained classifier's row for it.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import torch
from timm.data import ImageNetInfo
from torch import nn

log = logging.getLogger(__name__)


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@lru_cache(maxsize=1)
def _lemma_index() -> dict[str, list[int]]:
    info = ImageNetInfo()
    index: dict[str, list[int]] = {}
    for i in range(1000):
        for lemma in info.index_to_description(i).split(", "):
            index.setdefault(_normalise(lemma), []).append(i)
    return index


def _candidates(name: str) -> list[str]:
    base = _normalise(name)
    forms = [base]
    if base.endswith("ies"):
        forms.append(base[:-3] + "y")
    if base.endswith("es"):
        forms.append(base[:-2])
    if base.endswith("s"):
        forms.append(base[:-1])
    return forms


def match_imagenet_classes(classes: list[str]) -> dict[str, int]:
    """Target class -> ImageNet index, for names that match exactly one ImageNet class
    (directly, through a synonym, or in singular form). Ambiguous names are left out."""
    index = _lemma_index()
    matches: dict[str, int] = {}
    for name in classes:
        for form in _candidates(name):
            hits = index.get(form, [])
            if len(set(hits)) == 1:
                matches[name] = hits[0]
                break
            if len(set(hits)) > 1:
                log.info("warm start: %r matches several ImageNet classes %s; left at random init", name, hits)
                break
    return matches


@torch.no_grad()
def warm_start_rows(head_linear: nn.Linear, source: nn.Linear, classes: list[str]) -> dict[str, int]:
    """Copy matched rows from `source` (the 1000-class classifier) into `head_linear`."""
    if source.out_features != 1000 or source.in_features != head_linear.in_features:
        return {}
    matches = match_imagenet_classes(classes)
    for name, src_row in matches.items():
        row = classes.index(name)
        head_linear.weight[row].copy_(source.weight[src_row])
        if head_linear.bias is not None and source.bias is not None:
            head_linear.bias[row].copy_(source.bias[src_row])
    return matches
