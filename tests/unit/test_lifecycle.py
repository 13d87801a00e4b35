"""The connection lifecycle's transition function: no event sequence leaves a connection
stuck or leaked, and no close discards bytes without a reset."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.lifecycle import Action, Event, LifecycleError, State, transition

TERMINAL = (Action.CLOSE, Action.RESET)


def possible(state: State) -> list[Event]:
    out = []
    for event in Event:
        try:
            transition(state, event)
        except LifecycleError:
            continue
        out.append(event)
    return out


@st.composite
def walks(draw: st.DrawFn) -> list[tuple[Event, bool]]:
    """Event sequences an engine can produce: mostly events possible in the state reached,
    sometimes any event at all (an engine bug, which the engine turns into FAIL)."""
    state = State.ACCEPTED
    events = []
    for _ in range(draw(st.integers(0, 30))):
        if draw(st.integers(0, 9)) == 0:
            event = draw(st.sampled_from(Event))
        else:
            event = draw(st.sampled_from(possible(state)))
        holding = draw(st.booleans())
        events.append((event, holding))
        state, _ = step(state, event, holding)
    return events


def step(state: State, event: Event, holding: bool) -> tuple[State, Action]:
    try:
        return transition(state, event, holding)
    except LifecycleError:
        return transition(state, Event.FAIL)


def run(events: list[tuple[Event, bool]]) -> tuple[State, list[tuple[Event, Action]]]:
    """Drive the function as an engine does: an impossible event is a bug, handled as FAIL."""
    state = State.ACCEPTED
    actions: list[tuple[Event, Action]] = []
    for event, holding in events:
        new, action = step(state, event, holding)
        try:
            transition(state, event, holding)
            actions.append((event, action))
        except LifecycleError:
            actions.append((Event.FAIL, action))
        state = new
    return state, actions


@given(walks())
def test_sockets_are_closed_exactly_once_and_only_at_the_end(
    events: list[tuple[Event, bool]],
) -> None:
    state, actions = run(events)
    ends = [i for i, (_, a) in enumerate(actions) if a in TERMINAL]
    assert len(ends) == (1 if state is State.CLOSED else 0)
    if ends:
        assert all(a is Action.NONE for _, a in actions[ends[0] + 1 :])


@given(walks())
def test_each_fin_is_passed_on_at_most_once_and_only_once_connected(
    events: list[tuple[Event, bool]],
) -> None:
    _, actions = run(events)
    done = [a for _, a in actions]
    for fin in (Action.FIN_TO_BACKEND, Action.FIN_TO_CLIENT):
        assert done.count(fin) <= 1
    connected = next((i for i, (e, _) in enumerate(actions) if e is Event.CONNECTED), None)
    for i, (_, action) in enumerate(actions):
        if action in (Action.FIN_TO_BACKEND, Action.FIN_TO_CLIENT, Action.DELIVER_TO_BACKEND):
            assert connected is not None
            assert connected < i


@given(walks())
def test_a_close_that_would_lose_bytes_is_a_reset(events: list[tuple[Event, bool]]) -> None:
    _, actions = run(events)
    for (event, action), (_, holding) in zip(actions, events, strict=True):
        # (an impossible event was recorded as FAIL)
        if event is Event.SHUT and holding:
            assert action in (Action.RESET, Action.NONE)
        if event in (Event.CLIENT_RESET, Event.BACKEND_RESET, Event.FAIL, Event.DELIVERED):
            assert action is not Action.CLOSE  # a reset is never passed on as a clean end


@given(walks())
def test_a_peer_reset_delivers_its_bytes_then_resets(events: list[tuple[Event, bool]]) -> None:
    state, actions = run(events)
    delivering = [i for i, (_, a) in enumerate(actions) if a.name.startswith("DELIVER")]
    assert len(delivering) <= 1
    if delivering:
        after = [a for _, a in actions[delivering[0] + 1 :] if a is not Action.NONE]
        assert after in ([], [Action.RESET])
        assert (state is State.CLOSING) == (after == [])


@given(walks())
def test_no_state_is_a_dead_end(events: list[tuple[Event, bool]]) -> None:
    """From wherever a sequence leads, the proxy's own close ends it, and so does a failure."""
    state, _ = run(events)
    for event in (Event.SHUT, Event.FAIL):
        end, action = transition(state, event)
        assert end is State.CLOSED
        assert action in TERMINAL or state is State.CLOSED


def test_both_fins_close_cleanly_in_either_order() -> None:
    for first, second, fin in (
        (Event.CLIENT_DONE, Event.BACKEND_DONE, Action.FIN_TO_BACKEND),
        (Event.BACKEND_DONE, Event.CLIENT_DONE, Action.FIN_TO_CLIENT),
    ):
        state, _ = run([(Event.CONNECT, False), (Event.CONNECTED, False)])
        state, action = transition(state, first)
        assert action is fin
        state, action = transition(state, second)
        assert (state, action) == (State.CLOSED, Action.CLOSE)


@pytest.mark.parametrize("state", [State.ESTABLISHED, State.BACKEND_HALF_CLOSED])
def test_a_client_reset_delivers_to_the_backend_first(state: State) -> None:
    assert transition(state, Event.CLIENT_RESET) == (State.CLOSING, Action.DELIVER_TO_BACKEND)
    assert transition(State.CLOSING, Event.DELIVERED) == (State.CLOSED, Action.RESET)


def test_a_reset_after_a_half_close_is_passed_on() -> None:
    state, action = transition(State.CLIENT_HALF_CLOSED, Event.CLIENT_RESET)
    assert (state, action) == (State.CLOSING, Action.DELIVER_TO_BACKEND)
    state, action = transition(State.BACKEND_HALF_CLOSED, Event.BACKEND_RESET)
    assert (state, action) == (State.CLOSING, Action.DELIVER_TO_CLIENT)


def test_before_the_backend_is_up_a_client_reset_ends_at_once() -> None:
    for state in (State.ACCEPTED, State.AWAITING_HEADER, State.CONNECTING):
        assert transition(state, Event.CLIENT_RESET) == (State.CLOSED, Action.RESET)


def test_impossible_events_are_refused() -> None:
    with pytest.raises(LifecycleError):
        transition(State.ACCEPTED, Event.CLIENT_DONE)
    with pytest.raises(LifecycleError):
        transition(State.ESTABLISHED, Event.CONNECTED)


def test_every_open_state_is_reachable() -> None:
    seen = {State.ACCEPTED}
    frontier = [State.ACCEPTED]
    while frontier:
        state = frontier.pop()
        for event in possible(state):
            for holding in (False, True):
                new, _ = transition(state, event, holding)
                if new not in seen:
                    seen.add(new)
                    frontier.append(new)
    assert seen == set(State)
