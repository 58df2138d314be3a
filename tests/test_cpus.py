"""visiontune.cpus: the CPUs this process may use, from its affinity mask and its cgroup's
CPU quota (cgroup v2 cpu.max, v1 cpu.cfs_quota_us), not the host's count; the worker
defaults follow it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visiontune.cpus import cpu_quota, own_cgroups, usable_cpus

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cgroup(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n", encoding="ascii")
    return folder


def test_a_cgroup_v2_quota_caps_the_count(tmp_path: Path) -> None:
    assert cpu_quota(_cgroup(tmp_path / "half", cpu_max="50000 100000")) == 0.5
    assert usable_cpus([tmp_path / "half"]) == 1  # 0.5 CPU: one worker's worth, never 0
    assert cpu_quota(_cgroup(tmp_path / "none", cpu_max="max 100000")) is None
    assert usable_cpus([tmp_path / "none"]) == AFFINITY
    big = _cgroup(tmp_path / "big", cpu_max=f"{(AFFINITY + 8) * 100000} 100000")
    assert usable_cpus([big]) == AFFINITY  # a quota above the CPUs we may run on: the CPUs
    if AFFINITY >= 2:
        assert usable_cpus([_cgroup(tmp_path / "one-and-a-half", cpu_max="150000 100000"), big]) == 2  # rounded up


def test_a_cgroup_v1_quota_and_the_smallest_of_several(tmp_path: Path) -> None:
    v1 = _cgroup(tmp_path / "v1", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    assert cpu_quota(v1) == 1.0 and usable_cpus([v1]) == 1
    unlimited = _cgroup(tmp_path / "v1-none", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    assert cpu_quota(unlimited) is None and cpu_quota(tmp_path / "missing") is None
    assert cpu_quota(_cgroup(tmp_path / "junk", cpu_max="garbage")) is None
    assert usable_cpus([unlimited, tmp_path / "missing", v1]) == 1  # the parent's limit binds the child


def test_own_cgroups_reads_proc_and_walks_up_to_the_mount(tmp_path: Path) -> None:
    mount = tmp_path / "sys"
    _cgroup(mount, cgroup_controllers="cpu memory")  # a pure cgroup v2 mount
    leaf = _cgroup(mount / "kubepods" / "pod1", cpu_max="200000 100000")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n", encoding="ascii")
    assert own_cgroups(proc, mount) == [leaf, leaf.parent, mount]
    proc.write_text("0::/a/host/path/not/in/this/container\n", encoding="ascii")
    assert own_cgroups(proc, mount) == [mount]
    hybrid = tmp_path / "v1"
    cpu = _cgroup(hybrid / "cpu,cpuacct" / "docker" / "abc", cpu_cfs_quota_us="400000", cpu_cfs_period_us="100000")
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n", encoding="ascii")
    assert own_cgroups(proc, hybrid)[0] == cpu and cpu_quota(own_cgroups(proc, hybrid)[0]) == 4.0
    assert own_cgroups(tmp_path / "no-proc", mount) == []  # macOS, Windows


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_the_affinity_of_the_process_counts_and_sizes_the_workers(tmp_path: Path) -> None:
    """A real process pinned to one CPU (as `taskset -c 0` or a cpuset does): one usable
    CPU, and on a GPU 0 DataLoader workers, where os.cpu_count() still says the host's."""
    code = ("import json, os, sys, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from visiontune.cpus import usable_cpus; from visiontune.data.loaders import default_num_workers; "
            "print(json.dumps([usable_cpus([]), usable_cpus(), default_num_workers(torch.device('cuda')), "
            "os.cpu_count()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pinned, default, gpu_workers, host = json.loads(done.stdout)
    assert (pinned, default, gpu_workers) == (1, 1, 0) and host == os.cpu_count()


def test_the_worker_defaults_follow_the_usable_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-CPU container on a 64-core host: 3 workers on a GPU, not 15."""
    from visiontune.data import loaders

    quota = _cgroup(tmp_path / "four", cpu_max="400000 100000")
    monkeypatch.setattr(loaders, "usable_cpus", lambda: usable_cpus([quota]))  # the container, on this host
    if AFFINITY >= 4:
        assert loaders.default_num_workers(torch.device("cuda")) == 3
    assert loaders.default_num_workers(torch.device("cpu")) == 0


def test_nothing_sizes_a_pool_by_the_hosts_cpu_count() -> None:
    """One function counts the CPUs; os.cpu_count() stays only where the host is recorded
    (bundle.py's environment record) and as cpus.py's fallback."""
    src = Path(__file__).resolve().parents[1] / "src" / "visiontune"
    users = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "os.cpu_count()" in p.read_text(encoding="utf-8"))
    assert users == ["bundle.py", "cpus.py"]
