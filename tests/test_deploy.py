"""deploy/: compose, Kubernetes and Alertmanager files refer only to what exists.

Images are those the Dockerfile builds (or pinned official upstream images), mounted files are
in the repo, ports are the ones the programs listen on, and the generated Kubernetes files
(PrometheusRule, dashboards ConfigMap) equal what `python deploy/generate.py` writes.
No Docker engine or cluster is needed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.grafana import dashboards

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
# Image name -> the Dockerfile target that builds it.
BUILT = {"joulegate": "proxy", "joulegate-model-server": "model-server"}
# Official upstream images -> the port the program listens on by default.
OFFICIAL = {"prom/prometheus": 9090, "prom/alertmanager": 9093, "grafana/grafana": 3000}


def load_generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerfile_targets() -> dict[str, set[int]]:
    """Each build target of the Dockerfile and the ports it EXPOSEs."""
    targets: dict[str, set[int]] = {}
    current = None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = match[1]
            targets[current] = set()
        elif (match := re.match(r"EXPOSE\s+(.+)", line, re.IGNORECASE)) and current:
            targets[current] |= {int(port.split("/")[0]) for port in match[1].split()}
    return targets


def image_name(reference: str) -> str:
    name = reference.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    return name


def image_tag(reference: str) -> str | None:
    last = reference.split("@")[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def listen_port(arguments: list[str]) -> int:
    return int(arguments[arguments.index("--listen") + 1].rsplit(":", 1)[1])


def flag(arguments: list[str], name: str) -> str:
    return arguments[arguments.index(name) + 1]


def alert_names() -> set[str]:
    return {
        rule["alert"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_dockerfile_builds_both_images_on_their_ports() -> None:
    assert dockerfile_targets() == {"proxy": {8080}, "model-server": {8000}}


def test_generated_files_are_up_to_date() -> None:
    stale = load_generate().stale()
    assert stale == [], f"out of date (run python deploy/generate.py): {stale}"


# --------------------------------------------------------------------------------------------
# compose


COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def names_in(profile: str) -> dict[str, str]:
    """Host names reachable in a profile (service names and aliases) -> service."""
    found = {}
    for service, spec in SERVICES.items():
        if profile in spec.get("profiles", [profile]):
            found[service] = service
            for network in (spec.get("networks") or {}).values():
                for alias in (network or {}).get("aliases", []):
                    found[alias] = service
    return found


def service_port(service: str) -> int:
    """The port the service's program listens on, from its command or its image."""
    spec = SERVICES[service]
    name = image_name(spec["image"])
    return OFFICIAL[name] if name in OFFICIAL else listen_port(spec["command"])


@pytest.mark.parametrize("service", SERVICES)
def test_compose_images_are_built_here_or_official(service: str) -> None:
    spec = SERVICES[service]
    name = image_name(spec["image"])
    if name in BUILT:
        build = spec["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()
        assert build["target"] == BUILT[name]
    else:
        assert name in OFFICIAL, f"{service}: {spec['image']} is neither built here nor official"
        assert image_tag(spec["image"]) not in (None, "latest"), "pin upstream images"


@pytest.mark.parametrize("service", SERVICES)
def test_compose_mounts_only_files_in_the_repo(service: str) -> None:
    for volume in SERVICES[service].get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (DEPLOY / source).exists(), f"{service}: {source} does not exist"
        else:
            assert source in COMPOSE["volumes"], f"{service}: undeclared volume {source}"


@pytest.mark.parametrize("service", SERVICES)
def test_compose_ports_are_the_programs_ports(service: str) -> None:
    spec = SERVICES[service]
    name = image_name(spec["image"])
    port = service_port(service)
    if name in BUILT:
        assert port in dockerfile_targets()[BUILT[name]]
    published = {int(str(mapping).rsplit(":", 1)[1]) for mapping in spec.get("ports", [])}
    exposed = {int(port) for port in spec.get("expose", [])}
    assert published | exposed == {port}, service
    if "healthcheck" in spec:
        urls = re.findall(r"https?://[^'\"\s]+", " ".join(spec["healthcheck"]["test"]))
        assert urls and all(urlsplit(url).port == port for url in urls), service


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_profile_is_a_whole_stack(profile: str) -> None:
    names = names_in(profile)
    by_image: dict[str, list[str]] = {}
    for service in set(names.values()):
        by_image.setdefault(image_name(SERVICES[service]["image"]), []).append(service)
    assert {name: len(found) for name, found in by_image.items()} == dict.fromkeys(
        [*BUILT, *OFFICIAL], 1
    )
    (proxy,) = by_image["joulegate"]
    (model_server,) = by_image["joulegate-model-server"]
    for service in (proxy, model_server):
        reserved = SERVICES[service].get("deploy", {}).get("resources", {}).get("reservations")
        if profile == "gpu":
            assert reserved["devices"][0]["driver"] == "nvidia", service
            assert "gpu" in reserved["devices"][0]["capabilities"]
        else:
            assert reserved is None, f"{service}: the cpu profile reserves no GPU"
    # joulegate's upstream is this profile's model server, on its port.
    upstream = urlsplit(flag(SERVICES[proxy]["command"], "--upstream"))
    assert names[upstream.hostname] == model_server
    assert upstream.port == service_port(model_server)
    meter = flag(SERVICES[proxy]["command"], "--meter")
    assert meter == ("nvml" if profile == "gpu" else "cpu")
    # Prometheus scrapes joulegate and alerts Alertmanager by names that resolve here.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        target
        for job in prometheus["scrape_configs"]
        if job["job_name"] == "joulegate"
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    alertmanagers = [
        target
        for manager in prometheus["alerting"]["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    ]
    for target, service in [(t, proxy) for t in targets] + [
        (t, by_image["prom/alertmanager"][0]) for t in alertmanagers
    ]:
        host, port = target.rsplit(":", 1)
        assert names[host] == service and int(port) == service_port(service), target


def test_compose_prometheus_and_grafana_are_provisioned() -> None:
    prometheus = SERVICES["prometheus"]
    mounts = dict(volume.split(":")[:2] for volume in prometheus["volumes"])
    config = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = config.split("=", 1)[1]
    assert mounts["./prometheus/prometheus.yml"] == config_path
    # rule_files are relative to the config file: the rules folder must sit beside it.
    assert mounts["./prometheus/rules"] == str(Path(config_path).parent / "rules")

    alertmanager = SERVICES["alertmanager"]
    mounts = dict(volume.split(":")[:2] for volume in alertmanager["volumes"])
    config = next(arg for arg in alertmanager["command"] if arg.startswith("--config.file="))
    assert mounts["./alertmanager/alertmanager.yml"] == config.split("=", 1)[1]

    grafana = SERVICES["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provisioning = ROOT / "grafana" / "provisioning"
    assert mounts["../grafana/provisioning/datasources"] == (
        "/etc/grafana/provisioning/datasources"
    )
    assert mounts["../grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    provider = yaml.safe_load((provisioning / "dashboards" / "joulegate.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["../grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "grafana" / "dashboards" / Path(home).name).is_file()
    assert str(Path(home).parent) == mounts["../grafana/dashboards"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus"
    assert url.hostname in SERVICES and url.port == service_port(url.hostname)
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert datasource["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


# --------------------------------------------------------------------------------------------
# Kubernetes


KUSTOMIZATION = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
MANIFESTS = [
    document
    for name in KUSTOMIZATION["resources"]
    for document in yaml.safe_load_all((KUBERNETES / name).read_text())
    if document
]


def manifests(kind: str) -> list[dict[str, Any]]:
    return [document for document in MANIFESTS if document["kind"] == kind]


def containers() -> dict[str, dict[str, Any]]:
    """The Deployment's containers by image name."""
    (deployment,) = manifests("Deployment")
    return {
        image_name(container["image"]): container
        for container in deployment["spec"]["template"]["spec"]["containers"]
    }


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def test_kustomization_lists_every_manifest() -> None:
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(KUSTOMIZATION["resources"]) == on_disk
    assert {image["name"] for image in KUSTOMIZATION["images"]} == set(BUILT)


def test_kubernetes_images_are_built_here() -> None:
    assert set(containers()) == set(BUILT)


def test_kubernetes_ports_are_the_programs_ports() -> None:
    built = containers()
    targets = dockerfile_targets()
    for name, container in built.items():
        port = listen_port(container["args"])
        assert port in named_ports(container).values()
        assert port in targets[BUILT[name]]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in named_ports(container)
    upstream = urlsplit(flag(built["joulegate"]["args"], "--upstream"))
    assert upstream.hostname == "127.0.0.1"  # a sidecar: same pod, same network namespace
    assert upstream.port == listen_port(built["joulegate-model-server"]["args"])


def test_kubernetes_gpu_goes_to_the_model_server_and_joulegate_meters_it() -> None:
    built = containers()
    assert built["joulegate-model-server"]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert flag(built["joulegate"]["args"], "--meter") == "nvml"


def test_kubernetes_service_and_servicemonitor_reach_joulegate() -> None:
    (deployment,) = manifests("Deployment")
    (service,) = manifests("Service")
    (monitor,) = manifests("ServiceMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    joulegate_ports = named_ports(containers()["joulegate"])
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    for port in service_ports.values():
        assert port["targetPort"] in joulegate_ports, "the Service exposes joulegate only"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
    # The alerts' up{job="joulegate"}: the Prometheus Operator names the job after the Service.
    assert service["metadata"]["name"] == "joulegate"


def test_prometheus_rules_are_the_rules_files() -> None:
    rules = manifests("PrometheusRule")
    assert [rule["metadata"]["name"] for rule in rules] == [f"joulegate-{p.stem}" for p in RULES]
    for rule, path in zip(rules, RULES, strict=True):
        assert rule["spec"]["groups"] == yaml.safe_load(path.read_text())["groups"]


def test_dashboards_configmap_is_the_dashboards() -> None:
    (configmap,) = manifests("ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {name: json.loads(text) for name, text in configmap["data"].items()} == {
        f"{name}.json": body for name, body in dashboards().items()
    }


# --------------------------------------------------------------------------------------------
# Alertmanager


ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not on PATH (parsed instead)")
def test_amtool_check_config() -> None:
    result = subprocess.run(
        ["amtool", "check-config", str(ALERTMANAGER)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_routes_to_defined_receivers_and_real_alerts() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {receiver["name"] for receiver in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert {route["receiver"] for route in routes} <= receivers
    matchers = [matcher for route in routes for matcher in route.get("matchers", [])]
    for rule in config.get("inhibit_rules", []):
        matchers += rule["source_matchers"] + rule["target_matchers"]
    alerts = alert_names()
    for matcher in matchers:
        parsed = re.fullmatch(r'(\w+)\s*(=~|!~|!=|=)\s*"(.*)"', matcher)
        assert parsed, matcher
        label, operator, value = parsed.groups()
        if label == "alertname":
            pattern = value if "~" in operator else re.escape(value)
            assert any(re.fullmatch(pattern, alert) for alert in alerts), matcher
        elif label == "severity":
            assert value in {"critical", "warning", "info"}, matcher
