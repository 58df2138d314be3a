"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class VisiontuneError(Exception):
    """Base class: the message says what was received, what is valid and how to fix it."""

    def __str__(self) -> str:
        """The message. One raised in a DataLoader worker process is raised again in the
        main one with the worker's traceback before it ("Caught DataError in DataLoader
        worker process 0. Original Traceback ..."): the message alone is kept, so that the
        CLI's error stays one line whether or not workers read the images."""
        text = super().__str__()
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if text.startswith("Caught ") and marker in text:
            return text.rsplit(marker, 1)[1].rstrip("\n")
        return text


class DataError(VisiontuneError):
    """The images, folders or label file cannot be used as given."""


class WeightsUnavailableError(VisiontuneError):
    """Pretrained weights were asked for but cannot be had (offline, not cached)."""


class ConfigError(VisiontuneError):
    """An option value is invalid or options contradict each other."""
