"""Environment switches read on hot paths (the compiled kernels', ~100 reads per decoded token)."""

from __future__ import annotations

import os

# os.environ's own dict of bytes keys (CPython on POSIX), which its setters keep current: os.environ.get took 0.6 us
# a read (the key's encoding through the Mapping methods), a dict lookup 0.05 us
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def flag(name: str) -> bool:
    """Whether environment variable `name` is set to something other than "" or "0"."""
    if _ENVIRON_BYTES is not None:
        return _ENVIRON_BYTES.get(name.encode(), b"") not in (b"", b"0")
    return os.environ.get(name, "") not in ("", "0")
