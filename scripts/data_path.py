"""How far a run's data travels (issue 35's measure): a tiny `visiontune.fit` on generated
images under a profiler that records, call by call, each visiontune function that receives
the run's data among its arguments (other than `self`): the DataSource, its items (a list of
Item, or one Item) or the per-phase RunData. Prints the modules it
passes through and how often it comes back to a module it had already left.

    python scripts/data_path.py [--show]

The figure depends on the path a run takes (here: the default strategy on class folders),
not on timing; compare it before and after a change on the same commit's recipe.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("valid", 4)):
        for c, colour in enumerate(((200, 40, 40), (40, 200, 40))):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    return root


def trace() -> list[str]:
    import visiontune as vt
    from visiontune.data.items import DataSource, Item
    from visiontune.train.rundata import RunData

    kinds = (DataSource, RunData, Item)

    def is_data(v: object) -> bool:
        if isinstance(v, kinds):
            return True
        return isinstance(v, (list, tuple)) and len(v) > 0 and isinstance(v[0], Item)
    modules: list[str] = []

    def profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event != "call":
            return
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("visiontune"):
            return
        args = inspect.getargvalues(frame)
        values = [args.locals.get(a) for a in args.args if a != "self"]
        values += list(args.locals.get(args.varargs) or ()) if args.varargs else []
        if any(is_data(v) for v in values):
            if not modules or modules[-1] != name:
                modules.append(name)

    with tempfile.TemporaryDirectory() as tmp:
        data = _images(Path(tmp) / "d")
        sys.setprofile(profile)
        try:
            vt.fit(str(data), backbone="timm:test_efficientnet", weights="none", image_size=32, epochs=2,
                   batch_size=8, num_workers=0, progress=False, output=str(Path(tmp) / "runs"), seed=0)
        finally:
            sys.setprofile(None)
    return modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show", action="store_true", help="print the sequence of modules too")
    a = ap.parse_args()
    seq = trace()
    seen: set[str] = set()
    returns = 0
    for m in seq:
        returns += m in seen
        seen.add(m)
    if a.show:
        print("\n".join(seq))
    print(f"modules the run's data passes through: {len(seen)}; comes back to one it had left: {returns} times "
          f"({len(seq)} module changes)")


if __name__ == "__main__":
    main()
