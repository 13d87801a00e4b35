"""The connection listing's pure parts: pages and query parameters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.lifecycle import State
from tcpproxy.live_connections import MAX_PAGE_SIZE, Query, take_page


@given(
    ids=st.sets(st.integers(min_value=1, max_value=10_000), max_size=300),
    limit=st.integers(min_value=1, max_value=50),
    closed=st.sets(st.integers(min_value=1, max_value=10_000)),
)
def test_paging_visits_every_id_once_in_order(ids: set[int], limit: int, closed: set[int]) -> None:
    """Following next_after from the start yields each id once, in order, in pages of at most
    `limit`; ids that go away between pages (closed) are simply not seen again."""
    live = set(ids)
    seen: list[int] = []
    after: int | None = 0
    pages = 0
    while after is not None:
        page, after = take_page(live, lambda i: i, after, limit)
        assert len(page) <= limit
        assert after is None or after == page[-1]
        seen += page
        pages += 1
        live -= closed  # connections closing while the client pages
        assert pages <= len(ids) + 1
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen))
    assert set(ids) - closed <= set(seen) <= set(ids)


@given(
    limit=st.integers(min_value=1, max_value=MAX_PAGE_SIZE),
    after=st.integers(min_value=0, max_value=2**63),
    older=st.sampled_from(["0", "250ms", "30s", "5m", "1h", "2.5"]),
    state=st.sampled_from([None, "established", "half_closed", "draining"]),
)
def test_a_query_survives_its_own_parameters(
    limit: int, after: int, older: str, state: str | None
) -> None:
    params = {"limit": str(limit), "after": str(after), "older_than": older}
    if state is not None:
        params["state"] = state
    query = Query.parse(params)
    assert Query.parse(query.params()) == query


def test_state_filters() -> None:
    assert Query(state="half_closed").matches(State.CLIENT_HALF_CLOSED, False, 0)
    assert Query(state="half_closed").matches(State.BACKEND_HALF_CLOSED, False, 0)
    assert not Query(state="half_closed").matches(State.ESTABLISHED, False, 0)
    assert Query(state="draining").matches(State.CONNECTING, True, 0)
    assert not Query(state="draining").matches(State.ESTABLISHED, False, 0)
    assert Query(state="connecting").matches(State.CONNECTING, False, 0)
    assert not Query(older_than_s=10).matches(State.ESTABLISHED, False, 9.9)
    assert Query(older_than_s=10).matches(State.ESTABLISHED, False, 10)
