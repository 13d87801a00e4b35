"""Istio VirtualService and Gateway API TCPRoute documents as route config: the mapping, the
`convert` output, and one line per document and field for what cannot be mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpproxy.config import MAX_CONFIG_NODES, ConfigError, RouteConfig, load_config, parse_config
from tcpproxy.k8s_routes import native_yaml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "routes"
SOURCE = "routes.yaml"


def parsed(text: str) -> RouteConfig:
    return parse_config(text.encode(), SOURCE).config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text.encode(), SOURCE)
    return info.value.problems


def backends(config: RouteConfig, listener: int = 0) -> list[tuple[str, str, int]]:
    return [(b.name, b.address, b.weight) for b in config.listeners[listener].backends]


def virtual_service(tcp: list[Any], **metadata: str) -> str:
    document = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "app", **metadata},
        "spec": {"hosts": ["*"], "tcp": tcp},
    }
    return yaml.safe_dump(document)


def destination(host: str, port: int | None = 9000, weight: int | None = None) -> dict[str, Any]:
    dest: dict[str, Any] = {"host": host}
    if port is not None:
        dest["port"] = {"number": port}
    return {"destination": dest} if weight is None else {"destination": dest, "weight": weight}


def tcp_route(
    refs: list[dict[str, Any]],
    namespace: str | None = "apps",
    api_version: str = "gateway.networking.k8s.io/v1",
    parent_port: int | None = 8008,
) -> str:
    parent: dict[str, Any] = {"name": "gw"}
    if parent_port is not None:
        parent["port"] = parent_port
    metadata = {"name": "app"} if namespace is None else {"name": "app", "namespace": namespace}
    document = {
        "apiVersion": api_version,
        "kind": "TCPRoute",
        "metadata": metadata,
        "spec": {"parentRefs": [parent], "rules": [{"backendRefs": refs}]},
    }
    return yaml.safe_dump(document)


# -- fixtures in each format ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["istio-tcp-echo", "gateway-tcproute"])
def test_fixture_converts_to_its_native_twin(name: str) -> None:
    source = f"tests/fixtures/routes/{name}.yaml"
    loaded = load_config(FIXTURES / f"{name}.yaml")
    twin = (FIXTURES / f"{name}.native.yaml").read_text()
    assert native_yaml(loaded.config, source) == twin
    assert load_config(FIXTURES / f"{name}.native.yaml").config == loaded.config


def test_the_tcp_echo_shift_is_80_20_on_the_route_port() -> None:
    config = load_config(FIXTURES / "istio-tcp-echo.yaml").config
    (listener,) = config.listeners
    assert (listener.name, listener.bind) == ("tcp-echo", "0.0.0.0:31400")
    ns = "istio-io-tcp-traffic-shifting.svc.cluster.local"
    assert backends(config) == [
        ("tcp-echo-v1", f"tcp-echo-v1.{ns}:9000", 80),
        ("tcp-echo-v2", f"tcp-echo-v2.{ns}:9000", 20),
    ]


def test_the_tcp_echo_shift_with_subsets_is_one_line_per_subset() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FIXTURES / "istio-tcp-echo-subsets.yaml")
    path = FIXTURES / "istio-tcp-echo-subsets.yaml"
    assert [p.split(": cannot be mapped")[0] for p in info.value.problems] == [
        f"{path}: VirtualService tcp-echo: spec.tcp[0].route[0].destination.subset",
        f"{path}: VirtualService tcp-echo: spec.tcp[0].route[1].destination.subset",
    ]
    assert "DestinationRule" in info.value.problems[0]


def test_tcproute_two_backend_refs_across_a_granted_namespace() -> None:
    config = load_config(FIXTURES / "gateway-tcproute.yaml").config
    (listener,) = config.listeners
    assert (listener.name, listener.bind, listener.drain_timeout) == (
        "tcp-echo",
        "0.0.0.0:8008",
        60,
    )
    assert backends(config) == [
        ("tcp-echo-v1", "tcp-echo-v1.apps.svc.cluster.local:9000", 80),
        ("tcp-echo-v2.canary", "tcp-echo-v2.canary.svc.cluster.local:9000", 20),
    ]


# -- the mapping ---------------------------------------------------------------------------


def test_short_hosts_are_services_of_the_documents_namespace_and_dotted_hosts_stay() -> None:
    # Without a namespace a short name stays short: the resolver completes it (in a pod,
    # with the pod's own namespace).
    config = parsed(
        virtual_service(
            [
                {
                    "match": [{"port": 7000}],
                    "route": [destination("a", weight=1), destination("db.example.com", weight=3)],
                }
            ],
            namespace="prod",
        )
    )
    assert backends(config) == [
        ("a", "a.prod.svc.cluster.local:9000", 1),
        ("db.example.com", "db.example.com:9000", 3),
    ]
    no_namespace = parsed(
        virtual_service([{"match": [{"port": 7000}], "route": [destination("a")]}])
    )
    assert backends(no_namespace) == [("a", "a:9000", 1)]
    route = parsed(tcp_route([{"name": "a", "port": 1}], namespace=None))
    assert backends(route) == [("a", "a:1", 1)]


def test_a_lone_destination_takes_everything_and_an_unset_weight_among_several_is_0() -> None:
    lone = parsed(
        virtual_service([{"match": [{"port": 1}], "route": [destination("a", weight=0)]}])
    )
    assert backends(lone)[0][2] == 1
    several = parsed(
        virtual_service(
            [{"match": [{"port": 1}], "route": [destination("a"), destination("b", weight=5)]}]
        )
    )
    assert [w for _, _, w in backends(several)] == [0, 5]


def test_each_port_of_a_virtual_service_is_a_listener_named_by_its_port() -> None:
    config = parsed(
        virtual_service(
            [
                {"match": [{"port": 7000}, {"port": 7001}], "route": [destination("a")]},
                {"match": [{"port": 7002}], "route": [destination("b")]},
            ]
        )
    )
    assert [(lst.name, lst.bind) for lst in config.listeners] == [
        ("app-7000", "0.0.0.0:7000"),
        ("app-7001", "0.0.0.0:7001"),
        ("app-7002", "0.0.0.0:7002"),
    ]


def test_a_native_entry_adds_keys_to_a_routed_listener_and_may_sit_beside_it() -> None:
    text = virtual_service(
        [
            {
                "match": [{"port": 7000}],
                "route": [destination("a", weight=9), destination("b", weight=1)],
            }
        ]
    )
    text += """---
listeners:
  - name: app
    bind: "127.0.0.1:7100"
    idle_timeout: 5m
    rollout: {from: a, to: b, steps: [10, 100], step_duration: 1m}
  - name: plain
    bind: "127.0.0.1:7200"
    backends: [{name: x, address: "10.0.0.1:1"}]
"""
    app, plain = parsed(text).listeners
    assert (app.bind, app.idle_timeout, app.rollout is not None) == ("127.0.0.1:7100", 300, True)
    assert [b.name for b in app.backends] == ["a", "b"]
    assert (plain.name, [b.address for b in plain.backends]) == ("plain", ["10.0.0.1:1"])


@pytest.mark.parametrize(
    "api_version", ["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"]
)
def test_tcproute_weights_default_to_1_and_0_takes_no_traffic(api_version: str) -> None:
    config = parsed(
        tcp_route(
            [{"name": "a", "port": 1}, {"name": "b", "port": 2, "weight": 0}],
            api_version=api_version,
        )
    )
    assert config.listeners[0].bind == "0.0.0.0:8008"
    assert backends(config) == [
        ("a", "a.apps.svc.cluster.local:1", 1),
        ("b", "b.apps.svc.cluster.local:2", 0),
    ]


def test_convert_output_keeps_only_what_differs_from_defaults() -> None:
    text = virtual_service([{"match": [{"port": 7000}], "route": [destination("a")]}])
    out = native_yaml(
        parsed(text + "---\nlisteners: [{name: app, drain_timeout: 90s, ejection: null}]\n"), "x"
    )
    assert yaml.safe_load(out) == {
        "listeners": [
            {
                "name": "app",
                "bind": "0.0.0.0:7000",
                "backends": [{"name": "a", "address": "a:9000", "weight": 1}],
                "drain_timeout": 90,
                "ejection": None,
            }
        ]
    }


hosts = st.sampled_from(["v1", "v2", "canary", "db.example.com", "10.0.0.7"])


@settings(max_examples=60)
@given(
    route=st.lists(
        st.tuples(hosts, st.integers(1, 65535), st.integers(0, 1000)),
        min_size=1,
        max_size=5,
        unique_by=lambda t: t[0],
    ),
    port=st.integers(1, 65535),
    namespace=st.sampled_from(["default", "apps", "team-a"]),
)
def test_weights_map_one_to_one_and_convert_round_trips(
    route: list[tuple[str, int, int]], port: int, namespace: str
) -> None:
    text = virtual_service(
        [{"match": [{"port": port}], "route": [destination(h, p, w) for h, p, w in route]}],
        namespace=namespace,
    )
    config = parsed(text)
    (listener,) = config.listeners
    assert listener.bind == f"0.0.0.0:{port}"
    weights = [w for _, _, w in route] if len(route) > 1 else [1]
    assert [b.weight for b in listener.backends] == weights
    for backend, (host, p, _) in zip(listener.backends, route, strict=True):
        expected_host = host if "." in host else f"{host}.{namespace}.svc.cluster.local"
        assert backend.address == f"{expected_host}:{p}"
    assert parsed(native_yaml(config, SOURCE)) == config


@settings(max_examples=60)
@given(
    refs=st.lists(
        st.tuples(
            st.sampled_from(["v1", "v2", "v3", "canary"]),
            st.sampled_from([None, "apps", "other"]),
            st.integers(1, 65535),
            st.none() | st.integers(0, 1_000_000),
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda t: (t[0], t[1] or "apps"),
    )
)
def test_tcproute_weights_map_one_to_one_and_convert_round_trips(
    refs: list[tuple[str, str | None, int, int | None]],
) -> None:
    grant = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "other"},
        "spec": {
            "from": [
                {"group": "gateway.networking.k8s.io", "kind": "TCPRoute", "namespace": "apps"}
            ],
            "to": [{"group": "", "kind": "Service"}],
        },
    }
    written = []
    for name, namespace, port, weight in refs:
        ref: dict[str, Any] = {"name": name, "port": port}
        if namespace is not None:
            ref["namespace"] = namespace
        if weight is not None:
            ref["weight"] = weight
        written.append(ref)
    config = parsed(tcp_route(written) + "---\n" + yaml.safe_dump(grant))
    assert backends(config) == [
        (
            name if (namespace or "apps") == "apps" else f"{name}.{namespace}",
            f"{name}.{namespace or 'apps'}.svc.cluster.local:{port}",
            1 if weight is None else weight,
        )
        for name, namespace, port, weight in refs
    ]
    assert parsed(native_yaml(config, SOURCE)) == config


# -- what cannot be mapped: one line naming the document and field -------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            virtual_service([{"match": [{"port": 1}], "route": [destination("a", port=None)]}]),
            "VirtualService app: spec.tcp[0].route[0].destination.port: required",
        ),
        (
            virtual_service(
                [
                    {
                        "match": [{"port": 1, "sourceLabels": {"app": "x"}}],
                        "route": [destination("a")],
                    }
                ]
            ),
            "VirtualService app: spec.tcp[0].match[0].sourceLabels: cannot be mapped",
        ),
        (
            virtual_service(
                [{"match": [{"port": 1}], "route": [destination("a", weight=-1), destination("b")]}]
            ),
            "VirtualService app: spec.tcp[0].route[0].weight: Input should be greater",
        ),
        (
            virtual_service(
                [
                    {"match": [{"port": 1}], "route": [destination("a")]},
                    {"match": [{"port": 1}], "route": [destination("b")]},
                ]
            ),
            "VirtualService app: spec.tcp[1].match[0].port: 1 is already routed by spec.tcp[0]",
        ),
        (
            virtual_service(
                [
                    {"match": [{"port": 1}], "route": [destination("a")]},
                    {"route": [destination("b")]},
                ]
            ),
            "VirtualService app: spec.tcp[1].match: a port is required",
        ),
        (
            virtual_service(
                [{"match": [{"port": 1}], "route": [destination("a", 1), destination("a", 2)]}]
            ),
            "VirtualService app: spec.tcp[0].route[1].destination.host: a is already a backend",
        ),
        (
            tcp_route([{"name": "a", "port": 1}, {"name": "a", "port": 2}]),
            "TCPRoute app: spec.rules[0].backendRefs[1].name: a is already a backend",
        ),
        (
            virtual_service([{"route": [destination("a")]}]),
            "VirtualService app: no port to listen on",
        ),
        (
            virtual_service([{"match": [{"port": 1}], "route": [destination("a")]}]).replace(
                "tcp:", "http: [{route: [{destination: {host: a}}]}]\n  tcp:"
            ),
            "VirtualService app: spec.http: cannot be mapped",
        ),
        (
            virtual_service([]).replace("  tcp: []\n", ""),
            "VirtualService app: spec.tcp: required field is missing",
        ),
        (
            virtual_service([]),
            "VirtualService app: spec.tcp: at least one tcp route is required",
        ),
        (
            virtual_service([{"match": [{"port": 1}], "route": [destination("a")]}]).replace(
                "hosts:", "hostz:"
            ),
            "VirtualService app: spec.hostz: unknown key",
        ),
        (
            tcp_route([{"name": "a", "port": 1, "namespace": "other"}]),
            "TCPRoute app: spec.rules[0].backendRefs[0].namespace: a Service in namespace other",
        ),
        (
            tcp_route([{"name": "a", "port": 1, "namespace": "apps"}], namespace=None),
            "TCPRoute app: spec.rules[0].backendRefs[0].namespace: apps, from a TCPRoute without",
        ),
        (
            tcp_route([{"name": "a", "port": 1, "kind": "Pod"}]),
            "TCPRoute app: spec.rules[0].backendRefs[0].kind: cannot be mapped: only Service",
        ),
        (
            tcp_route([{"name": "a"}]),
            "TCPRoute app: spec.rules[0].backendRefs[0].port: required field is missing",
        ),
        (
            tcp_route([{"name": "a", "port": 1}]).replace(
                "- backendRefs:", "- backendRefs: [{name: b, port: 2}]\n  - backendRefs:"
            ),
            "TCPRoute app: spec.rules: cannot be mapped: a listener has one weighted set",
        ),
        (
            tcp_route([{"name": "a", "port": 1}], parent_port=None),
            "TCPRoute app: no port to listen on",
        ),
        (
            tcp_route([{"name": "a", "port": 1}], api_version="gateway.networking.k8s.io/v9"),
            "TCPRoute app: apiVersion: gateway.networking.k8s.io/v9 is not one of",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\n",
            "HTTPRoute web: kind: cannot be mapped: tcpproxy relays plain TCP",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n",
            "Service web: kind: Service (v1) is not read here",
        ),
        (
            "kind: TCPRoute\n",
            "document 1: apiVersion and kind are both required",
        ),
        (
            tcp_route([{"name": "a", "port": 1}])
            + "---\nlisteners: [{name: app, backends: [{name: b, address: 'b:1'}]}]\n",
            "document 2: listeners[0].backends: the backends of app come from TCPRoute app",
        ),
        (
            tcp_route([{"name": "a", "port": 1}])
            + "---\n"
            + tcp_route([{"name": "b", "port": 1}], parent_port=9),
            "TCPRoute app: name: 'app' is already used by TCPRoute app",
        ),
        (
            tcp_route([{"name": "a", "port": 1}])
            + "---\nlisteners: [{name: other, bind: '0.0.0.0:8008', backends: [B]}]\n".replace(
                "B", "{name: b, address: 'b:1'}"
            ),
            "document 2: listeners[0].bind: '0.0.0.0:8008' is already used by TCPRoute app",
        ),
        (
            tcp_route([{"name": "a", "port": 1}])
            + "---\nlisteners: [{name: app, drain_timeout: soon}]\n",
            "document 2: listeners[0].drain_timeout: invalid duration 'soon'",
        ),
    ],
)
def test_what_cannot_be_mapped_is_one_line(text: str, line: str) -> None:
    (problem,) = problems(text)
    assert problem.startswith(f"{SOURCE}: {line}"), problem


def test_a_cross_namespace_reference_needs_a_grant_for_that_route_namespace_and_service() -> None:
    route = tcp_route([{"name": "a", "port": 1, "namespace": "other"}])

    def grant(from_ns: str, name: str | None) -> str:
        to = {"group": "", "kind": "Service"} | ({} if name is None else {"name": name})
        return "---\n" + yaml.safe_dump(
            {
                "apiVersion": "gateway.networking.k8s.io/v1beta1",
                "kind": "ReferenceGrant",
                "metadata": {"name": "g", "namespace": "other"},
                "spec": {
                    "from": [
                        {
                            "group": "gateway.networking.k8s.io",
                            "kind": "TCPRoute",
                            "namespace": from_ns,
                        }
                    ],
                    "to": [to],
                },
            }
        )

    assert backends(parsed(route + grant("apps", None)))[0][1] == "a.other.svc.cluster.local:1"
    assert backends(parsed(route + grant("apps", "a")))[0][0] == "a.other"
    assert len(problems(route + grant("elsewhere", None))) == 1
    assert len(problems(route + grant("apps", "b"))) == 1


def test_the_readme_side_by_side_example_converts_as_it_says() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Coming from Istio / Gateway API", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]  # the stickiness comparison that follows
    blocks = [part.split("```", 1)[0] for part in section.split("```yaml\n")[1:]]
    istio, gateway, native, with_entry = blocks
    for text in (istio, gateway):
        assert native_yaml(parsed(text), SOURCE).split("\n", 1)[1] == native
    (listener,) = parsed(with_entry).listeners
    assert listener.bind == "0.0.0.0:8008"
    assert listener.rollout is not None
    assert (listener.rollout.from_, listener.rollout.to) == ("tcp-echo-v1", "tcp-echo-v2")


def test_a_kubectl_list_counts_its_items_as_documents() -> None:
    route = yaml.safe_load(tcp_route([{"name": "a", "port": 1}]))
    listing = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [route, {"kind": 1}]})
    assert problems(listing) == [
        f"{SOURCE}: document 1: items[1]: apiVersion and kind are both required"
    ]
    listing = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [route]})
    assert backends(parsed(listing)) == [("a", "a.apps.svc.cluster.local:1", 1)]


def test_the_node_limit_holds_for_all_documents_together() -> None:
    # Each document alone is within the limit (a single one of this size parses).
    half = MAX_CONFIG_NODES // 2 + 1
    document = "kind: x\nspec: [" + ", ".join(["0"] * half) + "]\n"
    (problem,) = problems("---\n".join([document] * 2))
    assert problem == f"{SOURCE}: too large: more than {MAX_CONFIG_NODES:,} YAML nodes"


def gateway(*listeners: tuple[str, int, str], namespace: str = "apps") -> str:
    return "---\n" + yaml.safe_dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": namespace},
            "spec": {
                "gatewayClassName": "any",
                "listeners": [
                    {"name": n, "port": p, "protocol": proto, "allowedRoutes": {}}
                    for n, p, proto in listeners
                ],
            },
        }
    )


def test_a_gateway_in_the_file_gives_its_tcp_listeners_ports_to_the_routes_naming_it() -> None:
    route = tcp_route([{"name": "a", "port": 1}], parent_port=None)
    tcp = ("tcp-echo", 8008, "TCP")
    config = parsed(route + gateway(tcp, ("web", 80, "HTTP"), ("db", 5432, "TCP")))
    assert [(lst.name, lst.bind) for lst in config.listeners] == [
        ("app-5432", "0.0.0.0:5432"),
        ("app-8008", "0.0.0.0:8008"),
    ]
    one = route.replace("- name: gw", "- name: gw\n    sectionName: tcp-echo")
    assert [lst.bind for lst in parsed(one + gateway(tcp)).listeners] == ["0.0.0.0:8008"]
    assert problems(one + gateway(("tcp-echo", 80, "HTTP"))) == [
        f"{SOURCE}: TCPRoute app: spec.parentRefs[0]: Gateway gw has no TCP listener named tcp-echo"
    ]
    # A Gateway of another namespace is another Gateway: no port from it.
    (problem,) = problems(route + gateway(tcp, namespace="infra"))
    assert problem.startswith(f"{SOURCE}: TCPRoute app: no port to listen on")
