"""A proxied connection's lifecycle: one state and a pure transition function, no I/O.

The engines (relay.py, splice.py) move bytes and report what happened as events; `transition`
says which state the connection is in next and what the engine must do to its sockets.

    ACCEPTED -AWAIT_HEADER-> AWAITING_HEADER -CONNECT-> CONNECTING -CONNECTED-> ESTABLISHED
    ACCEPTED -CONNECT-> CONNECTING;  CONNECTING -CONNECT (a retry)-> CONNECTING

    ESTABLISHED -CLIENT_DONE/FIN_TO_BACKEND-> CLIENT_HALF_CLOSED -BACKEND_DONE/CLOSE-> CLOSED
    ESTABLISHED -BACKEND_DONE/FIN_TO_CLIENT-> BACKEND_HALF_CLOSED -CLIENT_DONE/CLOSE-> CLOSED

    ESTABLISHED, either half-closed -CLIENT_RESET/DELIVER_TO_BACKEND-> CLOSING
    ESTABLISHED, either half-closed -BACKEND_RESET/DELIVER_TO_CLIENT-> CLOSING
    CLOSING -DELIVERED/RESET-> CLOSED;  CLOSING -the other's reset too/RESET-> CLOSED
    before ESTABLISHED: -CLIENT_RESET/RESET-> CLOSED
    any open state: -SHUT/CLOSE-> CLOSED, or -SHUT/RESET-> when bytes are held or in CLOSING;
    -FAIL/RESET-> CLOSED.  CLOSED takes every event and stays CLOSED.

The rules it encodes:
- A FIN is passed on only after every byte before it (the engine reports *_DONE then), and a
  connection closes cleanly once both ways are done.
- A close that discards bytes the proxy still holds is a reset, never a FIN: the far side must
  not mistake a truncated stream for a complete one.
- When one peer resets, what it sent before is delivered to the other (CLOSING), and only then
  is the reset passed on.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    ACCEPTED = "accepted"  # the listener has not decided yet
    AWAITING_HEADER = "awaiting_header"  # a required PROXY protocol header is not in yet
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLIENT_HALF_CLOSED = "client_half_closed"  # the client's FIN is passed on; backend->client open
    BACKEND_HALF_CLOSED = "backend_half_closed"
    CLOSING = "closing"  # a peer reset: its last bytes go to the other, then the reset
    CLOSED = "closed"


class Event(StrEnum):
    AWAIT_HEADER = "await_header"
    CONNECT = "connect"  # a connect to a backend starts (the first, or a retry)
    CONNECTED = "connected"
    CLIENT_DONE = "client_done"  # the client's FIN was read and every byte before it written
    BACKEND_DONE = "backend_done"
    CLIENT_RESET = "client_reset"  # a reset or a socket error on the client's side
    BACKEND_RESET = "backend_reset"
    DELIVERED = "delivered"  # CLOSING: the last bytes are with the surviving peer
    SHUT = "shut"  # the proxy ends it: idle, drain deadline, shutdown, rejected, connect failed
    FAIL = "fail"  # a bug in a handler: end this connection, never leave it stalled


class Action(StrEnum):
    NONE = "none"
    FIN_TO_BACKEND = "fin_to_backend"
    FIN_TO_CLIENT = "fin_to_client"
    DELIVER_TO_BACKEND = "deliver_to_backend"  # then DELIVERED
    DELIVER_TO_CLIENT = "deliver_to_client"
    CLOSE = "close"  # both sockets; the kernel still delivers what its buffers hold, then FIN
    RESET = "reset"  # both sockets, with RST


class LifecycleError(RuntimeError):
    """An event that cannot happen in the state (a bug in an engine)."""


_OPEN_BEFORE_RELAY = frozenset({State.ACCEPTED, State.AWAITING_HEADER, State.CONNECTING})
_RELAYING = frozenset({State.ESTABLISHED, State.CLIENT_HALF_CLOSED, State.BACKEND_HALF_CLOSED})

_TABLE: dict[tuple[State, Event], tuple[State, Action]] = {
    (State.ACCEPTED, Event.AWAIT_HEADER): (State.AWAITING_HEADER, Action.NONE),
    (State.ACCEPTED, Event.CONNECT): (State.CONNECTING, Action.NONE),
    (State.AWAITING_HEADER, Event.CONNECT): (State.CONNECTING, Action.NONE),
    (State.CONNECTING, Event.CONNECT): (State.CONNECTING, Action.NONE),
    (State.CONNECTING, Event.CONNECTED): (State.ESTABLISHED, Action.NONE),
    (State.ESTABLISHED, Event.CLIENT_DONE): (State.CLIENT_HALF_CLOSED, Action.FIN_TO_BACKEND),
    (State.ESTABLISHED, Event.BACKEND_DONE): (State.BACKEND_HALF_CLOSED, Action.FIN_TO_CLIENT),
    (State.CLIENT_HALF_CLOSED, Event.CLIENT_DONE): (State.CLIENT_HALF_CLOSED, Action.NONE),
    (State.CLIENT_HALF_CLOSED, Event.BACKEND_DONE): (State.CLOSED, Action.CLOSE),
    (State.BACKEND_HALF_CLOSED, Event.BACKEND_DONE): (State.BACKEND_HALF_CLOSED, Action.NONE),
    (State.BACKEND_HALF_CLOSED, Event.CLIENT_DONE): (State.CLOSED, Action.CLOSE),
    (State.CLOSING, Event.DELIVERED): (State.CLOSED, Action.RESET),
    # Late news from the peer that reset, or the survivor's own FIN: nothing changes.
    (State.CLOSING, Event.CLIENT_DONE): (State.CLOSING, Action.NONE),
    (State.CLOSING, Event.BACKEND_DONE): (State.CLOSING, Action.NONE),
    # The survivor reset too: nothing is left to deliver to.
    (State.CLOSING, Event.CLIENT_RESET): (State.CLOSED, Action.RESET),
    (State.CLOSING, Event.BACKEND_RESET): (State.CLOSED, Action.RESET),
}
for _state in _OPEN_BEFORE_RELAY:
    _TABLE[_state, Event.CLIENT_RESET] = (State.CLOSED, Action.RESET)
# A write before any relaying (a PROXY header) can meet the backend's reset.
_TABLE[State.CONNECTING, Event.BACKEND_RESET] = (State.CLOSED, Action.RESET)
for _state in _RELAYING:
    _TABLE[_state, Event.CLIENT_RESET] = (State.CLOSING, Action.DELIVER_TO_BACKEND)
    _TABLE[_state, Event.BACKEND_RESET] = (State.CLOSING, Action.DELIVER_TO_CLIENT)


def transition(state: State, event: Event, holding: bool = False) -> tuple[State, Action]:
    """The next state and what to do. `holding` (for SHUT): the proxy holds bytes it has not
    delivered, so ending now must be a reset. Raises LifecycleError for an impossible event."""
    if state is State.CLOSED:
        return State.CLOSED, Action.NONE  # late events for a closed connection change nothing
    if event is Event.SHUT:
        reset = holding or state is State.CLOSING
        return State.CLOSED, Action.RESET if reset else Action.CLOSE
    if event is Event.FAIL:
        return State.CLOSED, Action.RESET
    try:
        return _TABLE[state, event]
    except KeyError:
        raise LifecycleError(f"{event} in state {state}") from None


def is_open(state: State) -> bool:
    return state is not State.CLOSED


def is_connected(state: State) -> bool:
    """The backend connection is up (or was, for a connection now closing)."""
    return state in _RELAYING or state is State.CLOSING
