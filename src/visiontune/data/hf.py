"""Hugging Face datasets as DATA, for every command that reads labelled data (train, cv,
compare, advise, lr-find, shard, evaluate, interpret):

    visiontune train hf:beans                      # the Hub (online), or its local cache
    visiontune train hf:NAME:CONFIG --image-col img --label-col fine_label
    visiontune train saved/                        # a folder from Dataset(Dict).save_to_disk (offline)

- **Columns**: the image column is the one of type `datasets.Image` (`--image-col` when
  there are several); the label column is `--label-col`, else the first `ClassLabel`,
  else one named like a CSV's (label, labels, class, target, tags...).
- **The label's shape** comes from the column's type: a `ClassLabel` or text is a class
  (single-label), a list of them a label set (multi-label), a float a number
  (regression); `--task` overrides as for a CSV.
- **Splits**: the dataset's own (train; validation/valid/val; test); a split of another
  name (e.g. "unsupervised"), or one without the label column (a test split without
  labels), is left out and listed. Without a validation split (a single `Dataset`, train
  alone, train + test), `--valid-pct` of train validates, as for folders
  (data/splits.assign_validation). The columns are looked for in every split.
- **Images** are written once, with their stored bytes unchanged, into the cache
  (`$VISIONTUNE_CACHE/datasets/<digest>/<split>/<row>.<ext>`; the digest is of the
  dataset's fingerprints), because the rest of visiontune reads files and identifies
  images by path; an image stored as a path to an existing local file is used in place.
  Processes that read the dataset at once (torchrun's ranks) each write a file under a
  temporary name of their own and rename it: the last rename wins, every reader sees a
  whole image.
  `visiontune cache clear --only datasets` removes them; the next run writes them again.

Online, `hf:NAME` is `datasets.load_dataset(NAME, CONFIG)`. When the Hub cannot be reached
(checked with a 5 s connection first, never a retry loop), only the local Hugging Face
cache is tried, and failing that the error says how to work offline.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from visiontune.caches import FolderEntries, touch
from visiontune.config import DataConfig
from visiontune.data.items import TEST, TRAIN, VALID, DataSource, Item
from visiontune.data.tables import LABEL_COLUMNS, VALID_DIR_NAMES
from visiontune.errors import DataError
from visiontune.files import write_bytes, write_json

log = logging.getLogger(__name__)

PREFIX = "hf:"
INSTALL = "pip install 'visiontune[hf]'"
HUB_TIMEOUT_S = 5.0
DONE = "complete.json"  # written last in a dataset's cache folder: its images are all there


def is_hf(path: str | os.PathLike[str] | None) -> bool:
    """`hf:NAME[:CONFIG]`, or a folder written by `save_to_disk`."""
    if not path:
        return False
    text, p = str(path), Path(path)
    return text.startswith(PREFIX) or (p.is_dir() and ((p / "dataset_dict.json").is_file()
                                                       or (p / "state.json").is_file()
                                                       and (p / "dataset_info.json").is_file()))


def hf_source(cfg: DataConfig, cache_dir: str | None = None) -> DataSource:
    """The dataset `cfg.path` names as items whose paths are image files (see the module
    docstring)."""
    import datasets

    loaded = _load(cfg.path)
    parts = dict(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    source = DataSource(root=cfg.path, classes=[], items=[])
    splits = _known_splits(parts, source, cfg.path)
    features = _columns(splits)
    image_col = _image_column(features, cfg.image_col, cfg.path)
    label_col = _label_column(features, cfg.label_col, image_col, cfg.path)
    splits = _with_columns(splits, (image_col, label_col), source, cfg.path)
    folder = DatasetCache.location(cache_dir) / DatasetCache.key(splits, image_col, label_col)
    done = folder / DONE
    written = done.is_file()
    for name, (split, part) in splits.items():
        source.items += _items(part, name, split, image_col, label_col, folder, source.excluded, written)
    if not written:
        _sync()
        write_json(done, {"dataset": cfg.path, "image": image_col, "label": label_col,
                          "rows": {n: len(p) for n, (_, p) in splits.items()}})
    touch(folder)
    kind = type(features[label_col]).__name__
    source.detected = f"the {label_col!r} column ({kind}) of {cfg.path}"
    if _is_number(features[label_col]):
        source.target_name = label_col
    return source


def _known_splits(parts: dict[str, Any], source: DataSource, where: str) -> dict[str, tuple[str, Any]]:
    """name -> (visiontune's split, the part) of the train, validation and test splits; the
    others are listed in `source.excluded`. Which images validate is decided later, by one
    rule for every layout (data/splits.assign_validation: no validation split, then train
    is split by --valid-pct)."""
    splits: dict[str, tuple[str, Any]] = {}
    for name, part in parts.items():
        split = _split_of(name)
        if split is None:
            source.excluded.append((f"{where} split {name!r}", f"{len(part)} rows: not train, validation or test"))
        else:
            splits[name] = (split, part)
    if not splits:
        raise DataError(f"{where}: no train, validation or test split (it has {', '.join(parts)})")
    return splits


def _columns(splits: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Every split's columns, each with its type in the training split (else the first
    split holding it): the label column is looked for in all of them, since a test split
    may come first and hold no labels."""
    columns: dict[str, Any] = {}
    for _, part in sorted(splits.values(), key=lambda pair: pair[0] != TRAIN):
        for name, feature in part.features.items():
            columns.setdefault(name, feature)
    return columns


def _with_columns(splits: dict[str, tuple[str, Any]], needed: tuple[str, str], source: DataSource,
                  where: str) -> dict[str, tuple[str, Any]]:
    """The splits that hold the image and the label column; the others (a test split
    without labels) are left out and listed in `source.excluded`."""
    kept = {}
    for name, (split, part) in splits.items():
        missing = [c for c in needed if c not in part.features]
        if missing and split == TRAIN:  # what trains cannot be left out
            raise DataError(f"{where}: the training split {name!r} ({len(part)} rows) has no "
                            f"{' or '.join(repr(c) for c in missing)} column (it has {', '.join(part.features)}); "
                            "name its columns with --image-col and --label-col")
        if missing:
            source.excluded.append((f"{where} split {name!r}", f"{len(part)} rows: no "
                                    f"{' or '.join(repr(c) for c in missing)} column (left out)"))
        else:
            kept[name] = (split, part)
    if not kept:
        raise DataError(f"{where}: no split holds both the image column {needed[0]!r} and the label column "
                        f"{needed[1]!r}; name the columns with --image-col and --label-col")
    return kept


def _sync() -> None:
    """The images written without an fsync each reach the disk before the marker that
    vouches for them (one sync for all)."""
    if hasattr(os, "sync"):
        os.sync()


def _require() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"Hugging Face datasets need the datasets package: {INSTALL}") from None
    return datasets


def _load(path: str) -> Any:
    datasets = _require()
    if not path.startswith(PREFIX):
        return datasets.load_from_disk(path)
    name, _, config = path[len(PREFIX):].partition(":")
    if not name:
        raise DataError(f"{path!r}: name the dataset, hf:NAME or hf:NAME:CONFIG (e.g. hf:beans)")
    offline_hint = (f"save it where you are online (datasets.load_dataset({name!r}).save_to_disk('DIR')) and pass "
                    "DIR, or set HF_HUB_OFFLINE=1 to read the local Hugging Face cache only")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or not _hub_reachable():
        with _offline(datasets):
            try:
                return datasets.load_dataset(name, config or None)
            except Exception as exc:  # noqa: BLE001 - whatever the cache lookup raises, the answer is the same
                raise DataError(f"{path}: the Hugging Face Hub ({_endpoint()}) cannot be reached and the dataset is "
                                f"not in the local cache ({type(exc).__name__}); {offline_hint}") from None
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as exc:  # noqa: BLE001 - a missing name, a gated set, a config to choose
        raise DataError(f"{path}: datasets.load_dataset({name!r}{f', {config!r}' if config else ''}) failed: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable() -> bool:
    """One TCP connection to the Hub's host, HUB_TIMEOUT_S at most (no DNS retry loop)."""
    url = urlparse(_endpoint())
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


class _offline:
    """datasets and huggingface_hub in offline mode for one call (they read the flag once, at
    import; it is put back after)."""

    def __init__(self, datasets: Any) -> None:
        import huggingface_hub.constants as hub

        self.modules = (datasets.config, hub)

    def __enter__(self) -> None:
        self.saved = [m.HF_HUB_OFFLINE for m in self.modules]
        for m in self.modules:
            m.HF_HUB_OFFLINE = True

    def __exit__(self, *exc: Any) -> None:
        for m, value in zip(self.modules, self.saved):
            m.HF_HUB_OFFLINE = value


def _split_of(name: str) -> str | None:
    n = name.lower()
    return {"": "", "train": TRAIN, "test": TEST, **{v: VALID for v in (*VALID_DIR_NAMES, "dev")}}.get(n)


def _image_column(features: Any, named: str | None, where: str) -> str:
    import datasets

    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if named:
        if named not in features:
            raise DataError(f"--image-col {named!r} is not a column of {where}; columns: {', '.join(features)}")
        return named
    if len(images) != 1:
        found = f"several ({', '.join(images)})" if images else "none"
        raise DataError(f"{where}: image columns (datasets.Image): {found}; name one with --image-col "
                        f"(columns: {', '.join(features)})")
    return images[0]


def _label_column(features: Any, named: str | None, image_col: str, where: str) -> str:
    import datasets

    if named:
        if named not in features:
            raise DataError(f"--label-col {named!r} is not a column of {where}; columns: {', '.join(features)}")
        return named
    others = [k for k in features if k != image_col]
    found = next((k for k in others if isinstance(features[k], datasets.ClassLabel)), None) or \
        next((k for k in others if k.lower() in LABEL_COLUMNS), None)
    if found is None:
        raise DataError(f"{where}: no label column found (a ClassLabel, or one named {', '.join(LABEL_COLUMNS)}); "
                        f"name it with --label-col (columns: {', '.join(features)})")
    return found


def _is_number(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype.startswith("float")


def _label_of(feature: Any) -> Any:
    """value -> the item's label (a class name, a sorted tuple of names, a float), or None
    when the row has none."""
    import datasets

    inner = getattr(feature, "feature", None)  # List / Sequence / LargeList of something
    if inner is not None:
        one = _label_of(inner)
        return lambda v: None if v is None else tuple(sorted({one(x) for x in v} - {None}))
    if isinstance(feature, datasets.ClassLabel):
        return lambda v: None if v is None or v < 0 else feature.int2str(int(v))
    if _is_number(feature):
        return lambda v: None if v is None else float(v)
    return lambda v: None if v is None or str(v).strip() == "" else str(v).strip()


def _digest(splits: dict[str, Any], image_col: str, label_col: str) -> str:
    parts = [f"{name}:{getattr(part, '_fingerprint', '')}:{len(part)}" for name, (_, part) in sorted(splits.items())]
    return hashlib.sha256("|".join([*parts, image_col, label_col]).encode()).hexdigest()[:20]


class DatasetCache(FolderEntries):
    """A Hugging Face dataset's images, `<cache root>/datasets/<key>/<split>/<row>.<ext>`: a
    folder each (evicted whole), keyed by the digest of the splits' fingerprints and the
    columns read."""

    area = "datasets"
    folder = "datasets"
    keyed_by = "content"
    key = staticmethod(_digest)


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        return "." + (Image.open(io.BytesIO(data)).format or "img").lower().replace("jpeg", "jpg")
    except Exception:  # noqa: BLE001 - undecodable bytes are kept; the image check reports them
        return ".img"


def _items(part: Any, name: str, split: str, image_col: str, label_col: str, folder: Path,
           excluded: list[tuple[str, str]], written: bool) -> list[Item]:
    """One split's rows as items; images written under folder/<name>/ unless `written`
    already (and still there)."""
    import datasets

    label = _label_of(part.features[label_col])
    rows = part.cast_column(image_col, datasets.Image(decode=False)).select_columns([image_col, label_col])
    out_dir = folder / (name or "all")
    out_dir.mkdir(parents=True, exist_ok=True)
    known = {p.stem: p for p in out_dir.iterdir()} if written else {}
    items: list[Item] = []
    for start in range(0, len(rows), 512):
        batch = rows[start:start + 512]
        for offset, (image, value) in enumerate(zip(batch[image_col], batch[label_col])):
            row = start + offset
            where = f"{name or 'dataset'} row {row}"
            target = _image_file(image, out_dir, f"{row:08d}", known)
            y = label(value)
            if target is None:
                excluded.append((where, "no image"))
            elif y is None or y == "":
                excluded.append((where, f"no label in {label_col!r}"))
            else:
                items.append(Item(str(target), y, split))
    return items


def _image_file(image: Any, out_dir: Path, stem: str, known: dict[str, Path]) -> Path | None:
    """The file holding a row's image: its own local file, the copy written before, or a
    new file with its stored bytes."""
    if not image:
        return None
    data, path = image.get("bytes"), image.get("path")
    if not data:
        return Path(path) if path and os.path.isfile(path) else None
    if stem in known:
        return known[stem]
    target = out_dir / f"{stem}{_extension(data)}"
    write_bytes(target, data, sync=False)  # a temporary file of its own: ranks under torchrun write at once
    return target
