"""Checks the integration tests of one stack ask for (``pytest.mark.usefixtures``).

`make test` sets the whole stack up first, so a missing piece is a setup bug: the test fails
and names the fix; it is never skipped.
"""

from __future__ import annotations

import pytest

from tests.integration.container_env import have_container_stack
from tests.integration.dp_env import have_root_stack


@pytest.fixture
def dataplane_stack() -> None:
    problem = have_root_stack()
    if problem is not None:
        pytest.fail(f"the data-plane stack is not ready: {problem}; run `make setup`")


@pytest.fixture
def container_stack() -> None:
    problem = have_container_stack()
    if problem is not None:
        pytest.fail(f"the container stack is not ready: {problem}; run `make setup`")
