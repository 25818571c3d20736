"""Transparent huge pages for the memory a runtime command allocates, above all the weights ONNX Runtime prepacks.

A decode step on a CPU streams every weight once. With 4 KiB pages, 1.6 GB of weights is 400 000 pages, each a
TLB miss and a page walk (two-level under a hypervisor); with 2 MiB pages it is 800. Most Linux systems give huge
pages only to memory that asks for them (`madvise` in /sys/kernel/mm/transparent_hugepage/enabled), and ONNX
Runtime's allocator does not ask. glibc (2.35 and newer) asks, for every allocation it maps, under the tunable
`glibc.malloc.hugetlb=1`, which it reads only when a process starts. So `llama-generate`, `llama-chat` and
`llama-bench` restart themselves once with it set, before loading anything (`relaunch_with_huge_pages`);
`LLAMA_EXPORT_HUGEPAGES=0` keeps 4 KiB pages, and a glibc.malloc.hugetlb that GLIBC_TUNABLES already sets is left
as it is.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

NAME = "glibc.malloc.hugetlb"
TUNABLE = f"{NAME}=1"
SWITCH = "LLAMA_EXPORT_HUGEPAGES"  # "0": no restart, 4 KiB pages
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise, never), or None where there is none to read."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, ...] | None:
    library, version = platform.libc_ver()
    if library != "glibc" or not version:
        return None
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _hugetlb_tunable(tunables: str) -> str | None:
    """The value `GLIBC_TUNABLES` gives glibc.malloc.hugetlb, if any."""
    values = [t.partition("=")[2] for t in tunables.split(":") if t.partition("=")[0] == NAME]
    return values[-1] if values else None


class HugePages(NamedTuple):
    on: bool  # this process's large allocations get transparent huge pages
    reason: str  # why (or why not), in words
    can_request: bool  # off, but a restart with the tunable would turn them on


def huge_pages_state() -> HugePages:
    """Whether this process allocates on transparent huge pages, and why."""
    asked = _hugetlb_tunable(os.environ.get("GLIBC_TUNABLES", ""))
    if asked not in (None, "0"):
        return HugePages(True, f"GLIBC_TUNABLES sets {NAME}={asked}", False)
    mode = _thp_mode()
    if mode == "always":
        return HugePages(True, "the kernel gives every large allocation huge pages (mode always)", False)
    if asked == "0":  # the caller's own "no" stands
        return HugePages(False, f"GLIBC_TUNABLES sets {NAME}=0", False)
    if mode != "madvise":
        return HugePages(False, f"transparent huge pages are {mode or 'not available'} in this kernel", False)
    glibc = _glibc_version()
    if glibc is None or glibc < (2, 35):
        found = ".".join(map(str, glibc)) if glibc else "another C library"
        return HugePages(False, f"asking for them needs glibc 2.35 or newer ({found} here)", False)
    if os.environ.get(SWITCH) == "0":
        return HugePages(False, f"{SWITCH}=0", False)
    return HugePages(False, f"not requested (GLIBC_TUNABLES={TUNABLE} is not set)", True)


def relaunch_with_huge_pages() -> None:
    """Restart this process (same interpreter, arguments, environment and open files) with glibc asking for
    transparent huge pages, where the kernel gives them only on request and glibc can ask; otherwise return.
    Call it before loading a model: the restart discards everything this process holds."""
    if not huge_pages_state().can_request or not sys.executable:
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # cannot restart: go on with 4 KiB pages, the environment as it was
        if tunables is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = tunables


def pages_environ(huge: bool) -> dict[str, str]:
    """A copy of this environment for a child process on huge pages (the tunable set) or on 4 KiB pages (the tunable
    removed, and the runtime's commands told not to restart for it), the caller's other glibc tunables kept."""
    env = dict(os.environ)
    tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and t.partition("=")[0] != NAME]
    tunables += [TUNABLE] if huge else []
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    env.pop(SWITCH, None)
    if not huge:
        env[SWITCH] = "0"
    return env


def anon_huge_pages_bytes() -> int | None:
    """Bytes of this process's anonymous memory on transparent huge pages now (Linux), else None."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
