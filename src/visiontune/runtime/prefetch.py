"""Overlap reading with computing: a background thread iterates a loader while the model
runs on the previous batch.

With `num_workers=0` (the CPU default: worker processes compete with the model's own
threads) decoding and the forward pass alternate on the main thread. JPEG decoding and
resizing release the GIL, so one reader thread keeps the next batch ready while the model
(or an ONNX Runtime session) computes, without the per-process cost of DataLoader workers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_DONE = object()


class Prefetch:
    """Iterable over `loader` with up to `depth` batches read ahead by one thread.
    Exceptions raised while reading are re-raised on the consumer's side."""

    def __init__(self, loader: Iterable[Any], depth: int = 2) -> None:
        self.loader, self.depth = loader, max(1, depth)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        q: queue.Queue[Any] = queue.Queue(self.depth)
        stop = threading.Event()

        def read() -> None:
            try:
                for item in self.loader:
                    if stop.is_set():
                        return
                    q.put(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                q.put(_Failure(exc))
            q.put(_DONE)

        thread = threading.Thread(target=read, name="visiontune-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not _DONE:
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
