"""Istio VirtualService and Gateway API TCPRoute documents as route config (pure).

A config file may hold, instead of the native `listeners` mapping, the route documents a
mesh user already has (multi-document YAML, told apart by `apiVersion` and `kind`): each
becomes native listeners, so reloads, drains and pinning are the same whatever the format.
ReferenceGrants allow a TCPRoute's references to other namespaces, and a Gateway gives the
TCPRoutes that name it their ports. One document without `apiVersion` may go with them: its
`listeners` entries either are native listeners or, named like a route's listener, add keys
to it (the bind a TCPRoute lacks, timeouts, a rollout). What has no native equivalent is an
error naming the document and field, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)

from tcpproxy.config import (
    ConfigError,
    ListenerConfig,
    Name,
    RouteConfig,
    _capped,
    _format_validation_error,
    split_host_port,
)

ISTIO_GROUP = "networking.istio.io"
GATEWAY_GROUP = "gateway.networking.k8s.io"
# The versions of each kind read here; their fields are the same for what is mapped.
KINDS: dict[tuple[str, str], tuple[str, ...]] = {
    (ISTIO_GROUP, "VirtualService"): ("v1", "v1beta1", "v1alpha3"),
    (GATEWAY_GROUP, "TCPRoute"): ("v1", "v1alpha2"),
    (GATEWAY_GROUP, "ReferenceGrant"): ("v1", "v1beta1", "v1alpha2"),
    (GATEWAY_GROUP, "Gateway"): ("v1", "v1beta1"),
}
# Gateway API kinds that route other protocols than plain TCP.
_OTHER_ROUTES = {"HTTPRoute", "GRPCRoute", "TLSRoute", "UDPRoute"}
CLUSTER_DOMAIN = "svc.cluster.local"
# A route's port becomes a listener on every address, as the mesh's gateway listens.
BIND_HOST = "0.0.0.0"

Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def _non_empty(what: str) -> AfterValidator:
    def check(items: tuple[object, ...]) -> tuple[object, ...]:
        if not items:
            raise ValueError(f"at least one {what} is required")
        return items

    return AfterValidator(check)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Metadata(BaseModel):
    # Labels, annotations, uid and the rest select nothing here.
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Name
    # Unset: the namespace the document would be applied to, unknown here. Its Services
    # are then named by their short names, which a pod's resolver completes with its own
    # namespace: the one the ConfigMap holding this file, and so likely the document, is in.
    namespace: Name | None = None


class _Document(_Strict):
    apiVersion: str  # the Kubernetes field names, as written
    kind: str
    metadata: _Metadata
    status: object = None  # `kubectl get -o yaml` output has it


# -- Istio VirtualService ------------------------------------------------------------------


class _PortSelector(_Strict):
    number: Port


class _Destination(_Strict):
    host: str
    port: _PortSelector | None = None
    subset: str | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        split_host_port(f"{host}:1")  # the same host rule as a native address
        return host

    @field_validator("subset")
    @classmethod
    def _no_subset(cls, subset: str | None) -> None:
        if subset is not None:
            raise ValueError(
                "cannot be mapped: a subset picks pods by label through a DestinationRule; "
                "give each version a Service of its own and name it in host "
                "(for example tcp-echo-v1 and tcp-echo-v2)"
            )


class _RouteDestination(_Strict):
    destination: _Destination
    weight: StrictInt | None = Field(default=None, ge=0)


_L4_ONLY = "tcpproxy tells connections apart by port only"


class _L4Match(_Strict):
    port: Port | None = None
    destinationSubnets: object = None
    sourceLabels: object = None
    sourceNamespace: object = None
    gateways: object = None

    @field_validator("destinationSubnets", "sourceLabels", "sourceNamespace", "gateways")
    @classmethod
    def _port_only(cls, value: object) -> None:
        if value is not None:
            raise ValueError(f"cannot be mapped: {_L4_ONLY}")


class _TCPRule(_Strict):
    match: tuple[_L4Match, ...] = ()
    route: Annotated[tuple[_RouteDestination, ...], _non_empty("destination")]


class _VirtualServiceSpec(_Strict):
    # Which proxies and names the mesh applies it to: tcpproxy is the one proxy.
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    exportTo: tuple[str, ...] = ()
    tcp: Annotated[tuple[_TCPRule, ...], _non_empty("tcp route")]
    http: object = None
    tls: object = None

    @field_validator("http")
    @classmethod
    def _no_http(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "cannot be mapped: tcpproxy relays TCP connections and reads no HTTP; "
                "route the port with tcp:"
            )

    @field_validator("tls")
    @classmethod
    def _no_tls(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "cannot be mapped: TLS routes match the server name (SNI), which tcpproxy "
                "does not read; route the port with tcp:"
            )


class _VirtualService(_Document):
    spec: _VirtualServiceSpec


# -- Gateway API TCPRoute, ReferenceGrant and Gateway ---------------------------------------


class _ParentRef(_Strict):
    group: str = GATEWAY_GROUP
    kind: str = "Gateway"
    namespace: Name | None = None
    name: Name
    sectionName: str | None = None
    port: Port | None = None


class _BackendRef(_Strict):
    group: str = ""
    kind: str = "Service"
    name: Name
    namespace: Name | None = None
    port: Port
    weight: StrictInt = Field(default=1, ge=0, le=1_000_000)

    @field_validator("kind")
    @classmethod
    def _service(cls, kind: str) -> str:
        if kind != "Service":
            raise ValueError(f"cannot be mapped: only Service backends, not {kind}")
        return kind

    @field_validator("group")
    @classmethod
    def _core(cls, group: str) -> str:
        if group not in ("", "core"):
            raise ValueError(f"cannot be mapped: only core Service backends, not group {group}")
        return group


class _TCPRouteRule(_Strict):
    name: str | None = None
    backendRefs: Annotated[tuple[_BackendRef, ...], _non_empty("backendRef")]


class _TCPRouteSpec(_Strict):
    parentRefs: tuple[_ParentRef, ...] = ()
    rules: tuple[_TCPRouteRule, ...]

    @field_validator("rules")
    @classmethod
    def _one(cls, rules: tuple[_TCPRouteRule, ...]) -> tuple[_TCPRouteRule, ...]:
        if len(rules) != 1:
            raise ValueError(
                "cannot be mapped: a listener has one weighted set of backends, so a TCPRoute "
                f"needs exactly one rule (this one has {len(rules)}); write one TCPRoute each"
            )
        return rules


class _TCPRoute(_Document):
    spec: _TCPRouteSpec


class _GrantFrom(_Strict):
    group: str
    kind: str
    namespace: Name


class _GrantTo(_Strict):
    group: str
    kind: str
    name: Name | None = None


class _ReferenceGrantSpec(_Strict):
    from_: tuple[_GrantFrom, ...] = Field(alias="from")
    to: tuple[_GrantTo, ...]


class _ReferenceGrant(_Document):
    spec: _ReferenceGrantSpec


class _GatewayListener(BaseModel):
    # Hostname, TLS and allowedRoutes do not change which port a TCPRoute is served on.
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    port: Port
    protocol: str


class _GatewaySpec(BaseModel):
    # Only the listeners' ports are read: the class, addresses and infrastructure are how a
    # cluster provides the Gateway, and tcpproxy is the one providing it here.
    model_config = ConfigDict(extra="ignore", frozen=True)

    listeners: tuple[_GatewayListener, ...]


class _Gateway(_Document):
    """Read only for the ports of the TCPRoutes that name it."""

    spec: _GatewaySpec


_MODELS: dict[str, type[_Document]] = {
    "VirtualService": _VirtualService,
    "TCPRoute": _TCPRoute,
    "ReferenceGrant": _ReferenceGrant,
    "Gateway": _Gateway,
}


# -- mapping ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Routed:
    """A listener a route document defines, before a native entry adds its keys."""

    where: str  # "FILE: VirtualService tcp-echo", for messages
    name: str
    port: int | None
    backends: dict[str, dict[str, object]]  # by name, in the route's order
    native: dict[str, object] = field(default_factory=dict)  # the native entry's keys
    native_at: tuple[str, int] = ("", 0)  # ("FILE: document 2", its index in listeners)
    failed: bool = False  # the route has problems of its own: no more about this listener


def is_route_document(document: object) -> bool:
    """A document that says what it is (`apiVersion`, `kind`), unlike native config."""
    return isinstance(document, dict) and ("apiVersion" in document or "kind" in document)


def _service_address(name: str, namespace: str | None, port: int) -> str:
    if namespace is None:
        return f"{name}:{port}"
    return f"{name}.{namespace}.{CLUSTER_DOMAIN}:{port}"


def _add_backend(
    backends: dict[str, dict[str, object]], name: str, address: str, weight: int, at: str
) -> str | None:
    """Append a native backend; the problem if its name is taken. A backend is named by the
    Service (or host) alone, so that its name, and with it its connections, stays the same
    whatever happens to the other destinations."""
    if name in backends:
        return f"{at}: {name} is already a backend of this route (a backend is named by it)"
    backends[name] = {"name": name, "address": address, "weight": weight}
    return None


def _listener_names(name: str, ports: list[int | None]) -> list[str]:
    """One listener keeps the document's name; several are told apart by their ports."""
    return [name] if len(ports) == 1 else [f"{name}-{port}" for port in ports]


def _virtual_service(vs: _VirtualService, where: str, problems: list[str]) -> list[_Routed]:
    namespace, before = vs.metadata.namespace, len(problems)
    rules: list[tuple[int, int | None]] = []  # (rule index, port) for each listener
    seen: dict[int, int] = {}
    for r, rule in enumerate(vs.spec.tcp):
        ports = [m.port for m in rule.match]
        if not ports or None in ports:
            # No port, or a match without one: the rule takes every port.
            rules.append((r, None))
            continue
        for m, port in enumerate(ports):
            assert port is not None
            if port in seen:
                problems.append(
                    f"{where}: spec.tcp[{r}].match[{m}].port: {port} is already routed by "
                    f"spec.tcp[{seen[port]}]"
                )
                continue
            seen[port] = r
            rules.append((r, port))
    if len(rules) > 1 and any(port is None for _, port in rules):
        r = next(r for r, port in rules if port is None)
        problems.append(
            f"{where}: spec.tcp[{r}].match: a port is required: each tcp route of this "
            "VirtualService becomes a listener of its own, on its port"
        )
        return [_Routed(where, vs.metadata.name, None, {}, failed=True)]
    backends: dict[int, dict[str, dict[str, object]]] = {}
    for r, rule in enumerate(vs.spec.tcp):
        backends[r] = {}
        for d, item in enumerate(rule.route):
            dest, at = item.destination, f"{where}: spec.tcp[{r}].route[{d}].destination"
            if dest.port is None:
                problems.append(f"{at}.port: required: tcpproxy does not look up Service ports")
                continue
            host = dest.host
            if "." not in host:  # a short name is a Service in the document's namespace
                address = _service_address(host, namespace, dest.port.number)
            else:
                address = f"{host}:{dest.port.number}"
            # A lone destination takes all traffic whatever its weight; several share by
            # weight, an unset one counting 0 (as the mesh reads it).
            weight = 1 if len(rule.route) == 1 else (item.weight or 0)
            if problem := _add_backend(backends[r], host, address, weight, f"{at}.host"):
                problems.append(problem)
    names = _listener_names(vs.metadata.name, [p for _, p in rules])
    routed = [
        _Routed(where, name, port, backends[r])
        for (r, port), name in zip(rules, names, strict=True)
    ]
    for listener in routed:
        listener.failed = len(problems) > before
    return routed


def _granted(grants: list[_ReferenceGrant], from_ns: str, to_ns: str, service: str) -> bool:
    """A ReferenceGrant in `to_ns` lets TCPRoutes of `from_ns` name this Service."""
    for grant in grants:
        if grant.metadata.namespace != to_ns:
            continue
        sources = any(
            f.group == GATEWAY_GROUP and f.kind == "TCPRoute" and f.namespace == from_ns
            for f in grant.spec.from_
        )
        targets = any(
            t.group in ("", "core") and t.kind == "Service" and t.name in (None, service)
            for t in grant.spec.to
        )
        if sources and targets:
            return True
    return False


def _route_ports(
    route: _TCPRoute, where: str, gateways: list[_Gateway], problems: list[str]
) -> list[int | None]:
    """The ports a TCPRoute is served on: each parentRef's `port`, or the TCP listeners of
    the Gateway it names (the one `sectionName` names) when that Gateway is in the file.
    [None] when neither says: a native entry must give the bind."""
    ports: set[int] = set()
    for i, ref in enumerate(route.spec.parentRefs):
        if ref.port is not None:
            ports.add(ref.port)
            continue
        namespace = ref.namespace or route.metadata.namespace
        gateway = next(
            (
                g
                for g in gateways
                if (g.metadata.name, g.metadata.namespace) == (ref.name, namespace)
            ),
            None,
        )
        if gateway is None or ref.kind != "Gateway" or ref.group != GATEWAY_GROUP:
            continue
        found = [
            lst.port
            for lst in gateway.spec.listeners
            if lst.protocol == "TCP" and ref.sectionName in (None, lst.name)
        ]
        if not found:
            which = f"named {ref.sectionName}" if ref.sectionName else "at all"
            problems.append(
                f"{where}: spec.parentRefs[{i}]: Gateway {ref.name} has no TCP listener {which}"
            )
        ports.update(found)
    return [*sorted(ports)] or [None]


def _tcp_route(
    route: _TCPRoute,
    where: str,
    grants: list[_ReferenceGrant],
    gateways: list[_Gateway],
    problems: list[str],
) -> list[_Routed]:
    namespace, before = route.metadata.namespace, len(problems)
    backends: dict[str, dict[str, object]] = {}
    for k, ref in enumerate(route.spec.rules[0].backendRefs):
        at = f"{where}: spec.rules[0].backendRefs[{k}]"
        ref_ns = ref.namespace or namespace
        if ref_ns is not None and ref_ns != namespace:
            if namespace is None:
                problems.append(
                    f"{at}.namespace: {ref_ns}, from a TCPRoute without a namespace: set its "
                    "metadata.namespace (and add a ReferenceGrant if they differ)"
                )
                continue
            if not _granted(grants, namespace, ref_ns, ref.name):
                problems.append(
                    f"{at}.namespace: a Service in namespace {ref_ns} needs a ReferenceGrant "
                    f"there that lets TCPRoutes of namespace {namespace} refer to it (in this "
                    "file)"
                )
                continue
        name = ref.name if ref_ns == namespace else f"{ref.name}.{ref_ns}"
        address = _service_address(ref.name, ref_ns, ref.port)
        if problem := _add_backend(backends, name, address, ref.weight, f"{at}.name"):
            problems.append(problem)
    ports = _route_ports(route, where, gateways, problems)
    return [
        _Routed(where, name, port, backends, failed=len(problems) > before)
        for name, port in zip(_listener_names(route.metadata.name, ports), ports, strict=True)
    ]


def _where(source: str, label: str, document: dict[Any, Any]) -> str:
    kind = document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if isinstance(kind, str) and isinstance(name, str):
        return f"{source}: {kind} {name}"
    return f"{source}: {label}"


def _documents(documents: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """Each document with its place ("document 2"); the items of a `kind: List` (what
    `kubectl get ... -o yaml` prints for several objects) count as documents."""
    for n, document in enumerate(documents, start=1):
        items = document.get("items") if isinstance(document, dict) else None
        if (
            isinstance(items, list)
            and document.get("kind") == "List"
            and document.get("apiVersion") == "v1"
        ):
            for i, item in enumerate(items):
                yield f"document {n}: items[{i}]", item
        else:
            yield f"document {n}", document


def _check_kind(document: dict[Any, Any], where: str) -> str | None:
    """The problem with a document's apiVersion and kind, if any."""
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return f"{where}: apiVersion and kind are both required"
    group, _, version = api_version.rpartition("/")
    if (group, kind) not in KINDS:
        if kind in _OTHER_ROUTES:
            return f"{where}: kind: cannot be mapped: tcpproxy relays plain TCP; use a TCPRoute"
        known = ", ".join(f"{k} ({g})" for g, k in KINDS)
        return f"{where}: kind: {kind} ({api_version}) is not read here; route documents: {known}"
    if version not in KINDS[group, kind]:
        versions = ", ".join(f"{group}/{v}" for v in KINDS[group, kind])
        return f"{where}: apiVersion: {api_version} is not one of {versions}"
    return None


def _native_listener(
    entry: object, where: tuple[str, int], problems: list[str]
) -> ListenerConfig | None:
    try:
        return ListenerConfig.model_validate(entry)
    except ValidationError as exc:
        problems.extend(_format_validation_error(where[0], exc, ("listeners", where[1])))
        return None


def _merged(routed: _Routed, source: str, problems: list[str]) -> ListenerConfig | None:
    """The routed listener with its native entry's keys; each problem names where its field
    came from."""
    entry, (native_where, j) = routed.native, routed.native_at
    if routed.failed:
        return None
    if "backends" in entry:
        problems.append(
            f"{native_where}: listeners[{j}].backends: the backends of {routed.name} come from "
            f"{routed.where.removeprefix(source + ': ')}"
        )
        return None
    if routed.port is None and "bind" not in entry:
        problems.append(
            f"{routed.where}: no port to listen on: give the port in the route "
            "(VirtualService spec.tcp[].match[].port, TCPRoute spec.parentRefs[].port) or a "
            f'bind in a listeners entry named {routed.name} (bind: "0.0.0.0:8008")'
        )
        return None
    merged: dict[str, object] = {"name": routed.name, "backends": [*routed.backends.values()]}
    if routed.port is not None:
        merged["bind"] = f"{BIND_HOST}:{routed.port}"
    merged.update(entry)
    try:
        return ListenerConfig.model_validate(merged)
    except ValidationError as exc:
        # Each problem is told where its key was written: the native entry or the route.
        from_entry = [bool(e["loc"]) and e["loc"][0] in entry for e in exc.errors()]
        mine = _format_validation_error(native_where, exc, ("listeners", j))
        theirs = _format_validation_error(routed.where, exc)
        problems += [
            a if native else b for a, b, native in zip(mine, theirs, from_entry, strict=True)
        ]
        return None


def _label(where: str, source: str) -> str:
    """A listener's place without the file name: "document 2: listeners[0]"."""
    return where.removeprefix(f"{source}: ").rstrip(":. ")


def _read(
    documents: Iterable[Any], source: str, problems: list[str]
) -> tuple[list[tuple[str, _Document]], tuple[str, dict[Any, Any]] | None]:
    """The route documents, validated, each with its place; and the native document."""
    native: tuple[str, dict[Any, Any]] | None = None
    parsed: list[tuple[str, _Document]] = []
    for label, document in _documents(documents):
        if document is None:
            continue  # `---` with nothing after it
        if not isinstance(document, dict):
            problems.append(f"{source}: {label}: expected a mapping")
        elif not is_route_document(document):
            if native is not None:
                problems.append(
                    f"{source}: {label}: only one document without apiVersion and kind "
                    f"(native listeners) may go with route documents; {native[0]} is one"
                )
            else:
                native = (label, document)
        elif problem := _check_kind(document, where := _where(source, label, document)):
            problems.append(problem)
        else:
            try:
                parsed.append((where, _MODELS[document["kind"]].model_validate(document)))
            except ValidationError as exc:
                problems.extend(_format_validation_error(where, exc))
    return parsed, native


def _native_entries(
    native: tuple[str, dict[Any, Any]], source: str, routed: list[_Routed], problems: list[str]
) -> list[tuple[tuple[str, int], object]]:
    """Give each routed listener its native entry; the entries that are listeners of their
    own, each with its place."""
    label, document = native
    entries = document.get("listeners")
    if set(document) - {"listeners"} or not isinstance(entries, list):
        try:  # let the native model say what is wrong with it
            RouteConfig.model_validate(document)
        except ValidationError as exc:
            problems.extend(_format_validation_error(f"{source}: {label}", exc))
        return []
    by_name: dict[str, _Routed] = {}
    for r in routed:
        by_name.setdefault(r.name, r)  # a name used twice is reported with the rest
    own = []
    for j, entry in enumerate(entries):
        at = (f"{source}: {label}", j)
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in by_name:
            by_name[name].native, by_name[name].native_at = entry, at
        else:
            own.append((at, entry))
    return own


def _unique(
    listeners: list[tuple[str, ListenerConfig | None]], source: str, problems: list[str]
) -> None:
    """Names and binds used twice, each reported at the later use, naming the first."""
    binds: dict[tuple[str, int], int] = {}
    names: dict[str, int] = {}
    for i, (where, listener) in enumerate(listeners):
        if listener is None:
            continue
        if (first := names.setdefault(listener.name, i)) != i:
            problems.append(
                f"{where}name: {listener.name!r} is already used by "
                f"{_label(listeners[first][0], source)}"
            )
        if (first := binds.setdefault(split_host_port(listener.bind), i)) != i:
            problems.append(
                f"{where}bind: {listener.bind!r} is already used by "
                f"{_label(listeners[first][0], source)}"
            )
        seen: set[str] = set()
        for backend in listener.backends:
            if backend.name in seen:
                problems.append(f"{where}backends: {backend.name!r} appears twice")
            seen.add(backend.name)


def route_config(documents: Iterable[Any], source: str) -> RouteConfig:
    """The native config of a file of route documents (and at most one native document);
    ConfigError with one line per problem."""
    problems: list[str] = []
    parsed, native = _read(documents, source, problems)
    grants = [doc for _, doc in parsed if isinstance(doc, _ReferenceGrant)]
    gateways = [doc for _, doc in parsed if isinstance(doc, _Gateway)]
    routed: list[_Routed] = []
    for where, doc in parsed:
        if isinstance(doc, _VirtualService):
            routed += _virtual_service(doc, where, problems)
        elif isinstance(doc, _TCPRoute):
            routed += _tcp_route(doc, where, grants, gateways, problems)
    own = [] if native is None else _native_entries(native, source, routed, problems)
    # (where a problem with a key of it is reported, from "FILE: ..."; the listener)
    listeners: list[tuple[str, ListenerConfig | None]] = [
        (f"{r.where}: ", _merged(r, source, problems)) for r in routed
    ]
    listeners += [
        (f"{at[0]}: listeners[{at[1]}].", _native_listener(entry, at, problems))
        for at, entry in own
    ]
    if not problems and not listeners:
        problems.append(f"{source}: no VirtualService or TCPRoute: nothing to listen on")
    _unique(listeners, source, problems)
    if problems:
        raise ConfigError(_capped(problems, source))
    return RouteConfig(listeners=tuple(lst for _, lst in listeners if lst is not None))


# -- `tcpproxy convert` ------------------------------------------------------------------------


def _plain_numbers(value: Any) -> Any:
    """30.0 -> 30: durations come out of the model as float seconds."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(v) for v in value]
    return value


def native_yaml(config: RouteConfig, source: str) -> str:
    """The config as a native route config file: only keys that differ from their defaults,
    and every backend's weight."""
    data = _plain_numbers(config.model_dump(mode="json", by_alias=True, exclude_defaults=True))
    for listener in data["listeners"]:
        listener["backends"] = [
            {"name": b["name"], "address": b["address"], "weight": b.get("weight", 1)}
            for b in listener["backends"]
        ]
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    return f"# tcpproxy route config converted from {source}\n{body}"
