from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import harness


@pytest.fixture(params=["copy", "splice"])
def each_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per relay engine (listener_yaml's default engine)."""
    harness.DEFAULT_ENGINE[0] = request.param
    yield request.param
    harness.DEFAULT_ENGINE[0] = "copy"
