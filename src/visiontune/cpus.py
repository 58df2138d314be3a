"""The CPUs this process may use: what sizes worker pools (DataLoader workers, the scan's
processes, serve's decoding threads) instead of `os.cpu_count()`, which counts the host's.

Two limits apply, and a container usually sets one of them: the affinity mask (`taskset`,
`docker --cpuset-cpus`, a batch scheduler's CPU set: `os.sched_getaffinity`, Linux) and
the cgroup's CPU quota (`docker --cpus 4`, a Kubernetes CPU limit: cgroup v2's `cpu.max`,
v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`, in this process's cgroup or an ancestor).
A quota of 1.5 CPUs counts as 2. Elsewhere (macOS, Windows) it is `os.cpu_count()`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_MOUNT = Path("/sys/fs/cgroup")


def usable_cpus(cgroups: list[Path] | None = None) -> int:
    """How many CPUs this process may keep busy: its affinity mask, capped by the smallest
    CPU quota of `cgroups` (default: this process's cgroup folders and their ancestors);
    at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quotas = [q for q in map(cpu_quota, own_cgroups() if cgroups is None else cgroups) if q is not None]
    if quotas:
        count = min(count, math.ceil(min(quotas)))
    return max(1, count)


def cpu_quota(folder: Path) -> float | None:
    """The CPUs the cgroup `folder` may use in each period (cgroup v2's cpu.max: "200000
    100000" is 2.0, "max 100000" none; v1's cpu.cfs_quota_us over cpu.cfs_period_us, -1
    none), or None: no quota, or no such file."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text(encoding="ascii").split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text(encoding="ascii").strip()
            period = (folder / "cpu.cfs_period_us").read_text(encoding="ascii").strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def own_cgroups(proc_file: Path = Path("/proc/self/cgroup"), mount: Path = CGROUP_MOUNT) -> list[Path]:
    """The cgroup folders that can limit this process's CPU time: for each hierarchy with
    the cpu controller (v2's "0::/path", v1's "N:cpu,cpuacct:/path"), its folder under
    `mount` and every ancestor up to the mount (in a container whose cgroup path is the
    host's, the mount's root alone). [] where there is no /proc (macOS, Windows)."""
    try:
        lines = proc_file.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    folders: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, at the mount (pure v2) or at mount/unified (hybrid)
            roots = [mount] if (mount / "cgroup.controllers").is_file() else [mount / "unified"]
        elif "cpu" in controllers.split(","):
            roots = [mount / controllers, mount / "cpu"]
        else:
            continue
        for root in (r for r in roots if r.is_dir()):
            folders += _up_to(root, root / path.lstrip("/"))
    return list(dict.fromkeys(folders))


def _up_to(root: Path, folder: Path) -> list[Path]:
    if not folder.is_dir():
        return [root]
    return [folder, *(p for p in folder.parents if p == root or root in p.parents)]
