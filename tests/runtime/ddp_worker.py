"""Run by torchrun in tests/runtime/test_distributed.py: one tiny training run per process,
recording what each process saw (`train` is the one-process reference, run in the test's
process). `python ddp_worker.py DATA OUT SCENARIO`; SCENARIO may
contain "oom1" (rank 1 runs out of memory on more than 2 images at once), "workers2" (2
DataLoader workers), "shards" (DATA is a shard folder: a gentler recipe, 4 epochs), "pool"
(--unlabeled DATA/../pool with the consistency threshold at 0: every pool image counts)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import visiontune as vt
from visiontune.models.classifier import Classifier
from visiontune.train.callbacks import Callback


class Record(Callback):
    def __init__(self) -> None:
        self.rng: list[str] = []
        self.micro: int | None = None
        self.steps: list[int] = []  # optimizer steps per epoch

    def on_epoch_start(self, trainer) -> None:  # the random stream this epoch's augmentation draws from
        self.rng.append(hashlib.sha1(torch.random.get_rng_state().numpy().tobytes()).hexdigest())
        self.steps.append(0)

    def on_step_end(self, trainer) -> None:
        self.steps[-1] += 1

    def on_fit_end(self, trainer) -> None:
        self.micro = trainer.micro.size


def _small_memory_on_rank_1() -> None:
    forward = Classifier.forward

    def forward_or_oom(self: Classifier, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    Classifier.forward = forward_or_oom  # type: ignore[method-assign]


def train(data: str, out: Path, scenario: str, valid: str | None = None) -> tuple[dict, dict]:
    """One run of SCENARIO: (what this process saw, its weights). Called in-process too,
    as the one-process reference (tests/runtime/test_distributed.py)."""
    record = Record()
    recipe = dict(epochs=4, lr=3e-3, augment="none") if "shards" in scenario else dict(epochs=3, lr=1e-2, min_delta=1e9)
    result = vt.fit(data, callbacks=[record], backbone="timm:test_efficientnet", weights="none", image_size=32,
                    strategy="finetune", batch_size=12, num_workers=2 if "workers2" in scenario else 0,
                    progress=False, patience=0, trainable_bn="eval", seed=1, output=str(out / "runs"), name="run",
                    **recipe, **({"valid": valid} if valid else {}),
                    **({"unlabeled": str(Path(data).parent / "pool"), "consistency_threshold": 0.0}
                       if "pool" in scenario else {}))
    seen = {"rng": record.rng, "micro": record.micro, "steps": record.steps, "history": result.history,
            "best_epoch": result.best_epoch}
    return seen, {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}


def main() -> None:
    data, out, scenario = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    valid = sys.argv[4] if len(sys.argv) > 4 else None  # shards named by a pattern: their validation shards
    rank = int(os.environ["RANK"])
    if "oom1" in scenario and rank == 1:
        _small_memory_on_rank_1()
    out.mkdir(parents=True, exist_ok=True)
    # registered before fit, so it runs after any exit handler fit registers (atexit is LIFO)
    atexit.register(lambda: (out / f"exit{rank}.json").write_text(
        json.dumps({"group_alive": torch.distributed.is_initialized()})))
    seen, weights = train(data, out, scenario, valid)
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
