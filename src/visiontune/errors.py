"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class VisiontuneError(Exception):
    """Base class: the message says what was received, what is valid and how to fix it."""


class DataError(VisiontuneError):
    """The images, folders or label file cannot be used as given."""


class WeightsUnavailableError(VisiontuneError):
    """Pretrained weights were asked for but cannot be had (offline, not cached)."""


class ConfigError(VisiontuneError):
    """An option value is invalid or options contradict each other."""
