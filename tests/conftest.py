"""Suite-wide rules.

Tests marked `root` need the real stack (namespaces, DPDK, CRIU, runc). `make test` runs as
root after `make setup`, so a missing privilege is a setup error and fails loudly; a skip would
hide work not done.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _root_for_root_tests(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail("this test needs root and the stack `make setup` installs; run make test")
