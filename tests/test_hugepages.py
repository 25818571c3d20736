"""The runtime commands' restart onto transparent huge pages (runtime/hugepages.py), checked in real processes:
the restart keeps the arguments and the caller's other glibc tunables, and the memory glibc then maps is on huge
pages, which it is not without the restart."""

import json
import os
import subprocess
import sys

import pytest

from llama_export.runtime.hugepages import SWITCH, TUNABLE, huge_pages_state, pages_environ

# relaunch, then map 64 MiB through malloc (a bytearray: Python's own allocator, not numpy's madvise) and touch it
CHILD = """
import json, os, sys
from llama_export.runtime.hugepages import anon_huge_pages_bytes, huge_pages_state, relaunch_with_huge_pages
relaunch_with_huge_pages()
block = bytearray(64 << 20)
block[::4096] = b"x" * len(block[::4096])
print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"), "on": huge_pages_state().on,
                  "huge_mb": (anon_huge_pages_bytes() or 0) >> 20}))
"""


def child(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", SWITCH)} | env
    out = subprocess.run([sys.executable, "-c", CHILD, "--prompt", "two words"], capture_output=True, text=True,
                         env=environ, timeout=120, check=True)
    return json.loads(out.stdout)


needs_madvise = pytest.mark.skipif(not huge_pages_state().can_request,
                                   reason=f"no restart to ask for huge pages here: {huge_pages_state().reason}")


@needs_madvise
def test_relaunch_puts_malloc_on_huge_pages():
    on = child()
    assert on["argv"] == ["--prompt", "two words"] and on["tunables"] == TUNABLE and on["on"]
    assert on["huge_mb"] >= 32  # most of the 64 MiB block
    off = child(**pages_environ(False))
    assert off["tunables"] is None and not off["on"] and off["huge_mb"] < 32


@needs_madvise
def test_relaunch_keeps_other_tunables():
    out = child(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert out["tunables"] == f"glibc.malloc.arena_max=2:{TUNABLE}" and out["on"]
    again = child(GLIBC_TUNABLES=TUNABLE)  # already asked: no second restart, nothing appended
    assert again["tunables"] == TUNABLE
    refused = child(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")  # the caller's own "no" stands
    assert refused["tunables"] == "glibc.malloc.hugetlb=0" and not refused["on"] and refused["huge_mb"] < 32


def test_pages_environ_keeps_other_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0")
    monkeypatch.delenv(SWITCH, raising=False)
    huge, small = pages_environ(True), pages_environ(False)
    assert huge["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}" and SWITCH not in huge
    assert small["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and small[SWITCH] == "0"
