"""The unlabelled pool (`suggest POOL`, `train --unlabeled POOL`): its image files, each
checked once, less what is labelled already.

The pool is found as `train` finds images (data/sources.collect_images: by name, hidden
files and other extensions reported). Every file is then decoded once and its bytes hashed
(data/scan.py, remembered while the file is unchanged), as labelled data is: a file that
does not decode is left out with the reason, instead of stopping a run or a ranking
halfway. Left out as well, each with its reason: the labelled images (by resolved path,
and by the same bytes under another name, so that a copy of a validation image is never
trained on as unlabelled), the files the user left out on purpose (`--exclude`, in the
data or in the pool; `suggest --run`: those the run's excluded.txt lists), and exact
copies within the pool (the first is kept). Samples of WebDataset shards were checked when
they were written; their digests come from the shards' index. A file that cannot be read
any more when its features are computed (removed, or replaced by one that does not decode)
is skipped there and listed as these are (frozen/features.py `skip_unreadable`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from visiontune.data.items import LISTED_IN_EXCLUDE, excluded_lines
from visiontune.data.scan import ScanCache, digests_of, scan, scan_cache
from visiontune.data.sources import unlabelled_images
from visiontune.data.webdata import is_shard_item, shard_digests

SAME_AS_LABELLED = "the same bytes as a labelled image"
SAME_AS_LEFT_OUT = f"the same bytes as an image {LISTED_IN_EXCLUDE}"
SAME_IN_POOL = "the same bytes as another pool image"
LEFT_OUT = LISTED_IN_EXCLUDE


@dataclass
class Pool:
    paths: list[str]  # the images to use, in the order found
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, why): labelled, copies, left out
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why): files that do not decode

    def lose(self, unreadable: list[tuple[str, str]]) -> None:
        """Files found unreadable after the check (removed or replaced since): out of
        `paths`, listed in `unreadable`."""
        gone = {p for p, _ in unreadable}
        self.paths = [p for p in self.paths if p not in gone]
        self.unreadable += unreadable

    def report(self) -> str:
        """The pool in a line, and the files it could not read, as the data summary lists
        the labelled files it leaves out."""
        line = f"the unlabelled pool holds {len(self.paths)} images to learn from"
        if self.excluded:
            line += f"; left out {len(self.excluded)} ({reason_counts(self.excluded)})"
        return "\n".join([line, *excluded_lines(self.unreadable, "skipped", "files that cannot be read")])


def unlabelled_pool(inputs: Sequence[str], labelled: Iterable[str], cache_dir: str | os.PathLike[str] | None = None,
                    left_out: Iterable[str] = (), verify: bool = True) -> Pool:
    """The pool of `inputs` (folders searched recursively, files, shards) less the
    `labelled` images and the `left_out` ones (by path and by bytes), each file checked
    (`verify`: decoded once, as `train` checks labelled data; else only hashed)."""
    labelled, left_out = list(labelled), list(left_out)
    found, excluded = unlabelled_images(list(inputs), labelled + left_out)
    gone = {os.path.realpath(p) for p in left_out}
    excluded = [(p, LEFT_OUT if why == "labelled already" and os.path.realpath(p) in gone else why)
                for p, why in excluded]
    cache = scan_cache(cache_dir)
    verdicts = _verdicts(found, cache, verify)
    known = {d: SAME_AS_LABELLED for d in digests(labelled, cache) if d}
    known.update({d: SAME_AS_LEFT_OUT for d in digests(left_out, cache) if d and d not in known})
    pool = Pool([], excluded)
    for path, (reason, digest) in zip(found, verdicts):
        if reason is not None:
            pool.unreadable.append((path, reason))
        elif digest in known:
            pool.excluded.append((path, known[digest]))
        else:
            known[digest] = SAME_IN_POOL
            pool.paths.append(path)
    return pool


def _verdicts(paths: list[str], cache: ScanCache, verify: bool) -> list[tuple[str | None, str]]:
    """(why the file cannot be used or None, digest of its bytes) of each path: decoded and
    hashed (data/scan.py), or only hashed without `verify`; shard samples from their index."""
    files = [p for p in paths if not is_shard_item(p)]
    checked = scan(files, cache) if verify else [_hashed(p, cache) for p in files]
    by_path = dict(zip(files, checked))
    samples = [p for p in paths if is_shard_item(p)]
    by_path.update((p, (None, d)) for p, d in zip(samples, shard_digests(samples) if samples else []))
    return [by_path[p] for p in paths]


def _hashed(path: str, cache: ScanCache) -> tuple[str | None, str]:
    try:
        return None, digests_of([path], cache)[0]
    except OSError as exc:
        return f"cannot read: {exc}", ""


def digests(paths: Sequence[str], cache: ScanCache | None) -> list[str]:
    """The digest of each file's bytes (remembered by the scan cache while the file is
    unchanged), of each shard sample's image (from the shards' index); "" for a file
    that cannot be read."""
    files = [p for p in paths if not is_shard_item(p) and os.path.isfile(p)]
    found = dict(zip(files, digests_of(files, cache)))
    samples = [p for p in paths if is_shard_item(p)]
    found.update(zip(samples, shard_digests(samples) if samples else []))
    return [found.get(p, "") for p in paths]


def reason_counts(excluded: list[tuple[str, str]]) -> str:
    """'8 labelled already, 1 the same bytes as a labelled image': how many files for each reason."""
    counts: dict[str, int] = {}
    for _, why in excluded:
        counts[why] = counts.get(why, 0) + 1
    return ", ".join(f"{c} {why}" for why, c in sorted(counts.items(), key=lambda kv: -kv[1]))
