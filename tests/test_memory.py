"""`lit_amdet.memory.release_free_memory` hands freed heap pages back to the OS (glibc Linux)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a fresh process: a freed 24 MiB tensor raises glibc's mmap threshold, so forty 16 MiB tensors come from
# the heap; a tensor allocated after them keeps the heap's top in use, so freeing them returns nothing to the
# OS on its own. The resident set (MiB) before the blocks, after freeing them, and after the release.
PROBE = """
import json, os, torch
from lit_amdet.memory import release_free_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
big = torch.ones(6 * 2**20); del big
before = rss()
blocks = [torch.ones(4 * 2**20) for _ in range(40)]
keep = torch.ones(4 * 2**20)
del blocks
freed = rss()
released = release_free_memory()
print(json.dumps({"before": before, "freed": freed, "after": rss(), "released": released}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_freed_heap_memory_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    if not rss["released"]:
        pytest.skip("no malloc_trim in this C library")
    if rss["freed"] - rss["before"] < 400:
        pytest.skip("this allocator returned the freed tensors on its own")
    assert rss["after"] - rss["before"] < 100, rss  # the 640 MiB freed are no longer resident

