"""ds_kdqat.allocator: glibc's thresholds fixed so that freed tensor memory stays with the process.

Each check runs in a fresh interpreter: the settings are process-wide and would otherwise change the memory
behaviour of every later test in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ds_kdqat.allocator import USER_SETTINGS, retain_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")

# Resident set before, and after allocating, touching and freeing a 24 MiB block (above glibc's default mmap
# threshold, below the fixed one): with the default it is unmapped at once, retained it stays resident.
CHILD = """
import json, sys
import torch
from ds_kdqat.allocator import retain_freed_memory

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

applied = retain_freed_memory() if sys.argv[1] == "retain" else False
before = rss_kib()
block = torch.ones(6 << 20)  # 24 MiB, every page written
del block
print(json.dumps({"applied": applied, "kept_kib": rss_kib() - before}))
"""


def _child(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_block_stays_resident_only_when_retained():
    default, retained = _child("default"), _child("retain")
    assert not default["applied"] and retained["applied"]
    assert default["kept_kib"] < 4 * 1024  # the 24 MiB went back to the kernel
    assert retained["kept_kib"] >= 20 * 1024  # the 24 MiB stayed for the next tensor


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_user_setting_stands(name):
    got = _child("retain", **{name: "65536"})
    assert not got["applied"]
    assert got["kept_kib"] < 4 * 1024  # the user's 64 KiB mmap threshold (or default one) still unmaps it


@pytest.mark.parametrize("kwargs", [dict(mmap_threshold=0), dict(mmap_threshold=64 << 20),
                                    dict(trim_threshold=-1), dict(trim_threshold=2 ** 31)])
def test_out_of_range_thresholds_are_refused(kwargs, monkeypatch):
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="mmap_threshold must be"):
        retain_freed_memory(**kwargs)
