"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest

from ds4py.formats import kernels


@pytest.fixture(scope="module")
def lib():
    """The compiled CPU kernels; the test is skipped where they cannot be built."""
    if not kernels.available():
        pytest.skip("CPU kernels could not be built here")
