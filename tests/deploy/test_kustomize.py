"""Render every kustomization under deploy/k8s, validate it, and check what schemas cannot.

kubernetes-validate checks each object against the API's own schemas (offline, strict: an
unknown field is an error). The cross-reference tests catch what is valid YAML for the API
but broken as a whole: a probe naming a port no container has, a config path that is not
where the ConfigMap lands, a grace period shorter than the shutdown it must cover.
"""

from __future__ import annotations

import functools
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcpproxy.config import parse_config

from .tools import K8S_DIR, REPO_ROOT, check_route_config, find_tool, parse_duration, run

# The oldest Kubernetes the manifests need (native sidecars, preStop sleep on by default) and
# the newest the offline schemas know.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Seconds between the end of the shutdown timeout and SIGKILL, for the process to exit.
GRACE_MARGIN_SECONDS = 10
# Kinds from CRDs, absent from the Kubernetes schemas; checked by CRD_SHAPES below.
CRD_KINDS = {
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}

Doc = dict[str, Any]


def _kustomization_dirs() -> dict[str, str]:
    """Map of kustomization directory (relative to deploy/k8s) to its kind."""
    found: dict[str, str] = {}
    for path in sorted(K8S_DIR.rglob("kustomization.yaml")):
        doc = yaml.safe_load(path.read_text())
        found[path.parent.relative_to(K8S_DIR).as_posix()] = doc["kind"]
    return found


KUSTOMIZATIONS = sorted(d for d, kind in _kustomization_dirs().items() if kind == "Kustomization")
COMPONENTS = sorted(d for d, kind in _kustomization_dirs().items() if kind == "Component")


@functools.cache
def render(directory: str) -> tuple[Doc, ...]:
    out = run([find_tool("kubectl"), "kustomize", str(K8S_DIR / directory)]).stdout
    docs = tuple(d for d in yaml.safe_load_all(out) if d)
    assert docs, f"{directory} rendered no objects"
    return docs


def by_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    matches = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_containers(pod_spec: Doc) -> list[Doc]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def tcpproxy_containers(pod_spec: Doc) -> Iterator[Doc]:
    """Containers that run the proxy itself (`tcpproxy run`), as opposed to demo backends."""
    for container in pod_containers(pod_spec):
        if container.get("args", [])[:1] == ["run"] and "command" not in container:
            yield container


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from args {args}"
    return args[args.index(name) + 1]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_tree_has_the_expected_kustomizations() -> None:
    assert {"base", "examples/demo", "examples/demo-backends", "examples/shift-weights"} <= set(
        KUSTOMIZATIONS
    )
    assert "examples/sidecar" in KUSTOMIZATIONS
    assert {
        "components/internal-lb",
        "components/gke-podmonitoring",
        "components/servicemonitor",
        "components/image",
    } <= set(COMPONENTS)


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_is_rendered_by_an_example(component: str) -> None:
    users = []
    for directory in KUSTOMIZATIONS:
        doc = yaml.safe_load((K8S_DIR / directory / "kustomization.yaml").read_text())
        for ref in doc.get("components", []):
            if (K8S_DIR / directory / ref).resolve() == (K8S_DIR / component).resolve():
                users.append(directory)
    assert users, f"component {component} is used by no kustomization, so it is never rendered"


# --- Schema validation -------------------------------------------------------------------

# Strict shapes of the CRD objects we ship: key -> nested shape, or a type for a leaf.
# A list shape is `[item_shape]`. Unknown keys are errors, like kubernetes-validate --strict.
_LABELS = {"app.kubernetes.io/name": str, "app.kubernetes.io/component": str}
_METADATA = {"name": str, "labels": _LABELS, "namespace": str}
_ENDPOINT = {"port": str, "path": str, "interval": str}
CRD_SHAPES: dict[str, Any] = {
    "PodMonitoring": {
        "apiVersion": str,
        "kind": str,
        "metadata": _METADATA,
        "spec": {"selector": {"matchLabels": _LABELS}, "endpoints": [_ENDPOINT]},
    },
    "ServiceMonitor": {
        "apiVersion": str,
        "kind": str,
        "metadata": _METADATA,
        "spec": {"selector": {"matchLabels": _LABELS}, "endpoints": [_ENDPOINT]},
    },
}


def check_shape(value: Any, shape: Any, where: str) -> list[str]:
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        problems = [f"{where}.{k}: unknown field" for k in value if k not in shape]
        for key, sub in shape.items():
            if key in value:
                problems += check_shape(value[key], sub, f"{where}.{key}")
        return problems
    if isinstance(shape, list):
        if not isinstance(value, list) or not value:
            return [f"{where}: expected a non-empty list"]
        return [p for i, v in enumerate(value) for p in check_shape(v, shape[0], f"{where}[{i}]")]
    return [] if isinstance(value, shape) else [f"{where}: expected {shape.__name__}"]


def kubernetes_validate(docs: list[Doc], tmp_path: Path, version: str) -> None:
    manifest = tmp_path / f"rendered-{version}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    proc = run(
        [find_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(manifest)],
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"kubernetes-validate {version} failed:\n{output}"
    # A kind without a schema is only a warning there; here every object must be checked.
    assert "WARN" not in output, f"kubernetes-validate {version} could not check all:\n{output}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_renders_and_validates_strictly(directory: str, version: str, tmp_path: Path) -> None:
    docs = render(directory)
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    kubernetes_validate(builtin, tmp_path, version)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            assert check_shape(doc, CRD_SHAPES[doc["kind"]], where) == []


def test_strict_validation_rejects_unknown_fields(tmp_path: Path) -> None:
    """Guard the guard: --strict must fail a misspelled field, or the test above proves little."""
    docs = [dict(d) for d in render("base")]
    deployment = named(tuple(docs), "Deployment", "tcpproxy")
    deployment["spec"] = {**deployment["spec"], "replica": 3}
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    proc = run(
        [find_tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)], check=False
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr


# --- Cross-references, over every rendered kustomization ---------------------------------


def workloads(docs: tuple[Doc, ...]) -> Iterator[Doc]:
    yield from by_kind(docs, "Deployment")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_probes_name_ports_their_container_has(directory: str) -> None:
    for deployment in workloads(render(directory)):
        for container in pod_containers(deployment["spec"]["template"]["spec"]):
            port_names = {p["name"] for p in container.get("ports", []) if "name" in p}
            for probe_kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(probe_kind)
                if probe is None:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                assert action is not None, f"{container['name']} {probe_kind}: no action"
                port = action["port"]
                if isinstance(port, str):
                    assert port in port_names, (
                        f"{directory}: {deployment['metadata']['name']}/{container['name']} "
                        f"{probe_kind} names port {port!r}; container has {sorted(port_names)}"
                    )


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_gateway_probes_use_the_admin_endpoints(directory: str) -> None:
    for deployment in workloads(render(directory)):
        for container in tcpproxy_containers(deployment["spec"]["template"]["spec"]):
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
            admin = flag(container["args"], "--admin")
            assert admin.startswith("0.0.0.0:"), "probes come from the kubelet, not loopback"
            admin_port = {p["name"]: p["containerPort"] for p in container["ports"]}["admin"]
            assert admin.rpartition(":")[2] == str(admin_port)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_services_select_pods_with_their_target_ports(directory: str) -> None:
    docs = render(directory)
    for service in by_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            d["spec"]["template"]
            for d in workloads(docs)
            if labels_match(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert pods, f"{directory}: Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            for pod in pods:
                names = {
                    p.get("name") for c in pod_containers(pod["spec"]) for p in c.get("ports", [])
                }
                assert target in names, (
                    f"{directory}: Service {service['metadata']['name']} targets port "
                    f"{target!r}, pods have {sorted(n for n in names if n)}"
                )


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_monitors_scrape_the_admin_port(directory: str) -> None:
    docs = render(directory)
    for monitor in by_kind(docs, "PodMonitoring"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        pods = [
            d["spec"]["template"]
            for d in workloads(docs)
            if labels_match(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert pods, f"{directory}: PodMonitoring selects no pod"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            for pod in pods:
                names = {p.get("name") for c in pod_containers(pod["spec"]) for p in c["ports"]}
                assert endpoint["port"] in names
    for monitor in by_kind(docs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s for s in by_kind(docs, "Service") if labels_match(selector, s["metadata"]["labels"])
        ]
        assert services, f"{directory}: ServiceMonitor selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            for service in services:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
                assert service["spec"]["type"] == "ClusterIP", "metrics must not be public"


def mounted_route_configs(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc, str]]:
    """(deployment, tcpproxy container, config text) for every proxy container."""
    for deployment in workloads(docs):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in tcpproxy_containers(pod):
            config_path = flag(container["args"], "--config")
            mount_dir, _, key = config_path.rpartition("/")
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_dir]
            assert len(mounts) == 1, f"nothing is mounted at {mount_dir} for {config_path}"
            mount = mounts[0]
            # A subPath mount is never updated when the ConfigMap changes: no hot reload.
            assert "subPath" not in mount
            assert "subPathExpr" not in mount
            assert mount.get("readOnly") is True
            config_map_name = volumes[mount["name"]]["configMap"]["name"]
            config_map = named(docs, "ConfigMap", config_map_name)
            assert key in config_map["data"], (
                f"{config_path}: ConfigMap {config_map_name} has keys {sorted(config_map['data'])}"
            )
            yield deployment, container, config_map["data"][key]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_config_path_is_the_configmap_key_in_a_directory_mount(directory: str) -> None:
    docs = render(directory)
    proxies = [
        c for d in workloads(docs) for c in tcpproxy_containers(d["spec"]["template"]["spec"])
    ]
    assert len(list(mounted_route_configs(docs))) == len(proxies)
    if directory != "examples/demo-backends":
        assert proxies, f"{directory} runs no tcpproxy"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_route_configs_are_valid_and_match_the_ports(directory: str, tmp_path: Path) -> None:
    docs = render(directory)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    for deployment, container, text in mounted_route_configs(docs):
        check_route_config(text, tmp_path)
        # Native, or route documents: what the proxy makes of them.
        config = parse_config(text.encode(), "tcpproxy.yaml").config.model_dump()
        container_ports = {p["containerPort"] for p in container["ports"]}
        for listener in config["listeners"]:
            port = int(listener["bind"].rpartition(":")[2])
            is_sidecar = container in deployment["spec"]["template"]["spec"].get(
                "initContainers", []
            )
            if is_sidecar:
                assert listener["bind"].startswith("127.0.0.1:"), "a sidecar serves its pod only"
            else:
                assert port in container_ports, f"listener port {port} is not a containerPort"
            for backend in listener["backends"]:
                host, _, backend_port = backend["address"].rpartition(":")
                if host in services:
                    assert int(backend_port) in {p["port"] for p in services[host]["spec"]["ports"]}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_grace_period_covers_prestop_and_shutdown(directory: str) -> None:
    for deployment in workloads(render(directory)):
        pod = deployment["spec"]["template"]["spec"]
        for container in tcpproxy_containers(pod):
            pre_stop = container.get("lifecycle", {}).get("preStop", {})
            if "sleep" in pre_stop:
                pre_stop_seconds = float(pre_stop["sleep"]["seconds"])
            elif "exec" in pre_stop:
                command = pre_stop["exec"]["command"]
                assert command[0] == "sleep", f"unexpected preStop {command}"
                pre_stop_seconds = parse_duration(command[1])
            else:
                pre_stop_seconds = 0.0
            shutdown = parse_duration(flag(container["args"], "--shutdown-timeout"))
            grace = pod["terminationGracePeriodSeconds"]
            assert grace >= pre_stop_seconds + shutdown + GRACE_MARGIN_SECONDS, (
                f"{directory}: {deployment['metadata']['name']} terminationGracePeriodSeconds "
                f"{grace} < preStop {pre_stop_seconds} + shutdown {shutdown} + margin "
                f"{GRACE_MARGIN_SECONDS}"
            )


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_pods_are_locked_down(directory: str) -> None:
    for deployment in workloads(render(directory)):
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert isinstance(pod["securityContext"]["runAsUser"], int), name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        # Service links would put TCPPROXY_* variables (Services named tcpproxy*) in the env.
        assert pod.get("enableServiceLinks") is False, name
        for container in pod_containers(pod):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where


def test_gateway_deployment_rolls_without_losing_capacity() -> None:
    docs = render("base")
    deployment = named(docs, "Deployment", "tcpproxy")
    spec = deployment["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    # The HPA owns the replica count; a fixed one would be reset by every apply.
    assert "replicas" not in spec
    ports = {
        p["name"]: p["containerPort"] for p in spec["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports == {"proxy": 8008, "admin": 9901}
    assert spec["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] > 0

    hpa = named(docs, "HorizontalPodAutoscaler", "tcpproxy")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tcpproxy",
    }
    assert hpa["spec"]["minReplicas"] >= 2, "one replica cannot survive a disruption"

    pdb = named(docs, "PodDisruptionBudget", "tcpproxy")
    assert labels_match(
        pdb["spec"]["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]
    )


def test_gateway_service_is_a_load_balancer_on_8008() -> None:
    service = named(render("base"), "Service", "tcpproxy")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8008, "proxy")]
    assert "annotations" not in service["metadata"]
    admin = named(render("base"), "Service", "tcpproxy-admin")
    assert admin["spec"]["type"] == "ClusterIP"


def test_internal_variant_is_an_internal_load_balancer() -> None:
    service = named(render("examples/gke-internal"), "Service", "tcpproxy")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {
        "networking.gke.io/load-balancer-type": "Internal"
    }


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_route_configmaps_keep_a_fixed_name(directory: str) -> None:
    """A hash suffix would roll every pod on a weight change instead of hot-reloading."""
    kustomization = yaml.safe_load((K8S_DIR / directory / "kustomization.yaml").read_text())
    for generator in kustomization.get("configMapGenerator", []):
        assert generator.get("options", {}).get("disableNameSuffixHash") is True, generator
        named(render(directory), "ConfigMap", generator["name"])


def test_shift_weights_overlay_changes_only_the_weights() -> None:
    demo = render("examples/demo")
    shifted = render("examples/shift-weights")

    def key(doc: Doc) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    demo_by_key = {key(d): d for d in demo}
    shifted_by_key = {key(d): d for d in shifted}
    assert demo_by_key.keys() == shifted_by_key.keys()
    changed = [k for k in demo_by_key if demo_by_key[k] != shifted_by_key[k]]
    # Only the ConfigMap differs, so `kubectl apply` restarts no pod.
    assert changed == [("ConfigMap", "tcpproxy-routes")]

    def weights(docs: tuple[Doc, ...]) -> dict[str, int]:
        text = named(docs, "ConfigMap", "tcpproxy-routes")["data"]["tcpproxy.yaml"]
        (listener,) = yaml.safe_load(text)["listeners"]
        return {b["name"]: b["weight"] for b in listener["backends"]}

    assert weights(demo) == {"v1": 100, "v2": 0}
    assert weights(shifted) == {"v1": 0, "v2": 100}


def test_istio_routes_overlay_is_the_demo_with_a_virtual_service() -> None:
    demo, istio = render("examples/demo"), render("examples/istio-routes")
    assert [(d["kind"], d["metadata"]["name"]) for d in demo] == [
        (d["kind"], d["metadata"]["name"]) for d in istio
    ]
    assert [d for d in demo if d not in istio] == [named(demo, "ConfigMap", "tcpproxy-routes")]
    text = named(istio, "ConfigMap", "tcpproxy-routes")["data"]["tcpproxy.yaml"]
    assert "kind: VirtualService" in text
    (listener,) = parse_config(text.encode(), "tcpproxy.yaml").config.listeners
    (native,) = parse_config(
        named(demo, "ConfigMap", "tcpproxy-routes")["data"]["tcpproxy.yaml"].encode(), "x"
    ).config.listeners
    assert [(b.address, b.weight) for b in listener.backends] == [
        ("tcp-echo-v1:9000", 80),
        ("tcp-echo-v2:9000", 20),
    ]
    assert [b.address for b in native.backends] == [b.address for b in listener.backends]
    same = ("name", "bind", "drain_timeout", "connect_timeout", "idle_timeout", "max_connections")
    assert {k: getattr(listener, k) for k in same} == {k: getattr(native, k) for k in same}


def test_sidecar_is_a_native_sidecar() -> None:
    deployment = named(render("examples/sidecar"), "Deployment", "tcp-client")
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    app = pod["containers"][0]
    assert "8008" in " ".join(app["command"])


def test_demo_backends_run_the_echo_command() -> None:
    docs = render("examples/demo-backends")
    for version in ("v1", "v2"):
        deployment = named(docs, "Deployment", f"tcp-echo-{version}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["echo", "--listen", "0.0.0.0:9000", "--name", version]
        assert named(docs, "Service", f"tcp-echo-{version}")["spec"]["ports"][0]["port"] == 9000


def _readme_image_command() -> str:
    """The README's command that points the manifests at a pushed image (a `sed -i`, with a
    backslash continuation)."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^ *(sed -i .*?deploy/k8s/\S+)$", text, re.MULTILINE | re.DOTALL)
    assert match, "README has no `sed -i ... deploy/k8s/...` command for the image"
    return match.group(1)


def test_the_readme_command_sets_the_image_of_every_example(tmp_path: Path) -> None:
    """One place sets the image: after the README's command, in a copy of the tree, every
    container of every kustomization runs the pushed image and none the placeholder."""
    shutil.copytree(K8S_DIR, tmp_path / "deploy" / "k8s")
    (tmp_path / "README.md").write_text((REPO_ROOT / "README.md").read_text())
    pushed = "europe-docker.pkg.dev/proj/tcpproxy/tcpproxy:9.8.7"
    run(["env", f"IMAGE={pushed}", "bash", "-ec", _readme_image_command()], cwd=tmp_path)
    for directory in KUSTOMIZATIONS:
        out = run([find_tool("kubectl"), "kustomize", str(tmp_path / "deploy/k8s" / directory)])
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        images = {
            container["image"]
            for deployment in by_kind(tuple(docs), "Deployment")
            for container in pod_containers(deployment["spec"]["template"]["spec"])
        }
        assert images == {pushed}, (directory, images)


@pytest.mark.parametrize("directory", [d for d in KUSTOMIZATIONS if d.startswith("examples/")])
def test_every_example_includes_the_backends_it_routes_to(directory: str) -> None:
    """An example applies as it is: every backend its routes name is a Service in it."""
    docs = render(directory)
    services = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    routed = [
        # A Service's cluster name (tcp-echo-v1.default.svc.cluster.local) is the Service.
        backend.host.split(".svc.cluster.local")[0].split(".")[0]
        if backend.host.endswith(".svc.cluster.local")
        else backend.host
        for _, _, text in mounted_route_configs(docs)
        for listener in parse_config(text.encode(), directory).config.listeners
        for backend in listener.backends
    ]
    missing = sorted({host for host in routed if host not in services})
    assert missing == [], f"{directory} routes to Services it does not include: {missing}"


def test_every_image_is_the_one_built_here() -> None:
    for directory in KUSTOMIZATIONS:
        for deployment in workloads(render(directory)):
            for container in pod_containers(deployment["spec"]["template"]["spec"]):
                image = container["image"]
                assert re.fullmatch(r"[\w./-]*tcpproxy(:[\w.-]+)?", image), (directory, image)


# --- Who can reach the admin port ---------------------------------------------------------


def _is_loopback_bind(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _rule_covers(rule: Doc, port_name: str, port_number: int) -> bool:
    """An ingress rule that admits connections to this container port."""
    ports = rule.get("ports")
    if not ports:
        return True  # no ports: every port
    for port in ports:
        if port.get("protocol", "TCP") != "TCP":
            continue
        value = port.get("port")
        if value is None or value == port_name:
            return True
        if isinstance(value, int) and value <= port_number <= port.get("endPort", value):
            return True
    return False


def _admits_anyone(rule: Doc) -> bool:
    peers = rule.get("from")
    if not peers:
        return True  # no `from`: every source
    for peer in peers:
        if "ipBlock" in peer:
            return True
        # A peer with one selector only is a whole namespace, or the pod's own namespace.
        if not peer.get("namespaceSelector") or not peer.get("podSelector"):
            return True
    return False


def exposure_problems(docs: tuple[Doc, ...]) -> list[str]:
    """Every tcpproxy container whose admin server listens beyond loopback must be covered
    by a NetworkPolicy that lets only selected pods (scrapers) reach the admin port, and
    clients reach its other ports."""
    problems = []
    policies = [p for p in by_kind(docs, "NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]]
    for deployment in workloads(docs):
        template = deployment["spec"]["template"]
        name = deployment["metadata"]["name"]
        for container in tcpproxy_containers(template["spec"]):
            if _is_loopback_bind(flag(container["args"], "--admin")):
                continue
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            mine = [
                p
                for p in policies
                if labels_match(
                    p["spec"]["podSelector"]["matchLabels"], template["metadata"]["labels"]
                )
            ]
            if not mine:
                problems.append(f"{name}: no NetworkPolicy selects its pods")
                continue
            rules = [rule for policy in mine for rule in policy["spec"].get("ingress", [])]
            for rule in rules:
                if _rule_covers(rule, "admin", ports["admin"]) and _admits_anyone(rule):
                    problems.append(f"{name}: a NetworkPolicy rule opens the admin port to all")
            for port_name, number in ports.items():
                if port_name != "admin" and not any(
                    _rule_covers(r, port_name, number) for r in rules
                ):
                    problems.append(f"{name}: port {port_name} ({number}) is closed to clients")
    return problems


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_the_admin_port_is_open_to_scrapers_only(directory: str) -> None:
    assert exposure_problems(render(directory)) == []


def test_the_exposure_check_catches_an_open_admin_port() -> None:
    """Guard the guard: the same check fails a policy that opens every port to everyone."""
    docs = [dict(d) for d in render("base")]
    policy = named(tuple(docs), "NetworkPolicy", "tcpproxy")
    policy["spec"] = {**policy["spec"], "ingress": [{}]}
    assert exposure_problems(tuple(docs)) == [
        "tcpproxy: a NetworkPolicy rule opens the admin port to all"
    ]
    policy["spec"] = {**policy["spec"], "ingress": []}
    assert exposure_problems(tuple(docs)) == ["tcpproxy: port proxy (8008) is closed to clients"]
    without = tuple(d for d in docs if d["kind"] != "NetworkPolicy")
    assert exposure_problems(without) == ["tcpproxy: no NetworkPolicy selects its pods"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_admin_token_comes_from_a_mounted_secret(directory: str) -> None:
    """The gateway's control endpoints need a token: a file in a Secret mounted as a
    directory (so a rotation reaches it), readable by the proxy's group only. The Secret
    itself is never in the repository: it is created in the cluster."""
    docs = render(directory)
    assert by_kind(docs, "Secret") == [], "a secret in the repository"
    kustomization = yaml.safe_load((K8S_DIR / directory / "kustomization.yaml").read_text())
    assert "secretGenerator" not in kustomization
    for deployment in workloads(docs):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in tcpproxy_containers(pod):
            where = f"{directory}: {deployment['metadata']['name']}/{container['name']}"
            env = {e["name"] for e in container.get("env", [])}
            assert "TCPPROXY_ADMIN_TOKEN" not in env, f"{where}: a token in the manifest"
            if "--admin-token-file" not in container["args"]:
                # No token: control is off unless the admin address is loopback.
                assert deployment["metadata"]["name"] != "tcpproxy", f"{where}: gateway, no token"
                continue
            token_path = flag(container["args"], "--admin-token-file")
            mount_dir, _, key = token_path.rpartition("/")
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_dir]
            assert mount.get("readOnly") is True, where
            assert "subPath" not in mount, f"{where}: a subPath mount never sees a rotation"
            secret = volumes[mount["name"]]["secret"]
            assert secret.get("optional") is not True, f"{where}: would start without a token"
            items = {i["path"]: i["key"] for i in secret.get("items", [])}
            assert key in items or not items, f"{where}: {key} is not in the Secret volume"
            mode = secret.get("defaultMode", 0o644)
            assert mode & 0o007 == 0, f"{where}: the token file is readable by everyone"
            assert mode & 0o040, f"{where}: the token file is not group-readable"
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_the_gateway_has_a_token_and_a_network_policy() -> None:
    docs = render("base")
    (container,) = named(docs, "Deployment", "tcpproxy")["spec"]["template"]["spec"]["containers"]
    assert "--admin-token-file" in container["args"]
    assert named(docs, "NetworkPolicy", "tcpproxy")
