"""memory.heap: with the policy on, a loop of 32-64 MB temporaries settles into reusing freed memory, with no
page faults after its first rounds; without it (DS4PY_KEEP_HEAP=0, glibc's default) every round faults all of its
~540 MB in again (139,000 4 KB pages)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, torch
from ds4py.memory.heap import retain_freed_memory
print(retain_freed_memory())
faults = []
for _ in range(5):  # a prefill's pattern: large outputs made while the inputs are alive, then freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(4096, 4096)  # 64 MB
    for _ in range(3):
        y = torch.nn.functional.gelu(x)
        z = y.to(torch.bfloat16)  # 32 MB
        x = z.float()
    del x, y, z
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(min(faults[2:]))
"""


def probe(keep: str) -> tuple[str, int]:
    env = {**os.environ, "DS4PY_KEEP_HEAP": keep}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = probe("1")
    off_applied, off_faults = probe("0")
    assert (applied, off_applied) == ("True", "False")
    assert off_faults >= 50000  # (fewer where huge pages back the maps)
    assert faults < 20000
