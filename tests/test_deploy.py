"""The deploy files: Kubernetes manifests, alert rules, the Grafana dashboard and the Dockerfile's
health check, checked against their schemas, against each other and against the code's defaults.

Nothing here needs a cluster, a Docker engine or the network. `kubernetes-validate` (the test
extra) holds the Kubernetes schemas; `promtool` (Debian: `apt-get install prometheus`) and
`kustomize` (or `kubectl kustomize`) are used when they are on PATH and skipped otherwise.
"""

from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices

from indexer.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "mention-indexer.json"
DOCKERFILE = DEPLOY / "Dockerfile"
HEALTHCHECK = DEPLOY / "healthcheck.py"
PRODUCTION_DOC = ROOT / "docs" / "production.md"

# The oldest Kubernetes with native sidecars on by default (1.29), and a current one.
KUBERNETES_VERSIONS = ("1.29", "1.37")
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
INDEXER_CONTAINER = "indexer"
INDEXER_UID = 10001
URL_VARIABLES = ("DATABASE_URL", "SOURCE_DATABASE_URL", "REDIS_URL", "AMQP_URL")

# The metrics the indexer exports: name → type. Histograms also appear as _bucket, _sum, _count.
METRICS = {
    "mention_indexer_messages_total": "counter",
    "mention_indexer_dead_letters_total": "counter",
    "mention_indexer_lag_seconds": "histogram",
    "mention_indexer_last_applied_timestamp_seconds": "gauge",
    "mention_indexer_batch_messages": "histogram",
    "mention_indexer_batch_duration_seconds": "histogram",
    "mention_indexer_apply_duration_seconds": "histogram",
    "mention_indexer_invalidation_duration_seconds": "histogram",
    "mention_indexer_batches_total": "counter",
    "mention_indexer_retries_total": "counter",
    "mention_indexer_dependency_up": "gauge",
    "mention_indexer_invalidated_organizations_total": "counter",
    "mention_indexer_deliveries_in_hand": "gauge",
    "mention_indexer_seconds_since_last_delivery": "gauge",
    "mention_indexer_consumer_registered": "gauge",
    "mention_indexer_ready": "gauge",
}
LABEL_VALUES = {
    "outcome": {"applied", "duplicate", "stale", "ignored", "dead_lettered", "refresh", "held"},
    "reason": {
        "undecodable",
        "too_large",
        "missing_field",
        "bad_timestamp",
        "bad_organization_id",
        "out_of_range",
        "rejected_by_postgres",
    },
    "dependency": {"postgres", "redis", "rabbitmq"},
}
READINESS_PROBLEMS = ("postgres", "redis", "rabbitmq", "consumer", "indexer")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --- loading ---------------------------------------------------------------------------------


def _yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _kustomization_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("kustomization.yaml"))


def _manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in _manifest_files() for doc in _yaml_documents(path)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _manifests() if doc.get("kind") == kind]


def _workloads() -> list[dict[str, Any]]:
    """Every StatefulSet and Deployment: each runs an indexer."""
    found = [doc for _, doc in _manifests() if doc.get("kind") in ("StatefulSet", "Deployment")]
    assert {doc["kind"] for doc in found} == {"StatefulSet", "Deployment"}, "the sidecar and the replicas variant"
    return found


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _indexer(workload: dict[str, Any]) -> dict[str, Any]:
    pod = _pod_spec(workload)
    found = [c for c in [*pod.get("initContainers", []), *pod.get("containers", [])] if c["name"] == INDEXER_CONTAINER]
    assert len(found) == 1, f"{workload['metadata']['name']}: one container named {INDEXER_CONTAINER!r}"
    container: dict[str, Any] = found[0]
    return container


def _name(workload: dict[str, Any]) -> str:
    return f"{workload['kind']}/{workload['metadata']['name']}"


def _configmaps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for doc in _of_kind("ConfigMap")}


def _secrets() -> dict[str, dict[str, str]]:
    """The example Secrets' keys and values (stringData, or data as given)."""
    return {doc["metadata"]["name"]: {**doc.get("data", {}), **doc.get("stringData", {})} for doc in _of_kind("Secret")}


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets: its ConfigMaps (envFrom) under its own env entries."""
    configmaps = _configmaps()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: envFrom only from ConfigMaps (secrets are files)"
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"{container['name']}: ConfigMap {name!r} is not among the manifests"
        env.update({f"{source.get('prefix', '')}{key}": value for key, value in configmaps[name].items()})
    for entry in container.get("env", []):
        assert "value" in entry, f"{container['name']}: {entry['name']} from valueFrom: use a file (*_FILE) instead"
        env[entry["name"]] = entry["value"]
    return env


def _setting_variables() -> tuple[dict[str, str], set[str]]:
    """(variable → field name, for each field's first variable), and deprecated aliases."""
    primary: dict[str, str] = {}
    deprecated: set[str] = set()
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = [str(name) for name in alias.choices] if isinstance(alias, AliasChoices) else [str(alias)]
        primary[names[0]] = field_name
        deprecated.update(names[1:])
    return primary, deprecated


def _container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"{container['name']}: no container port named {port!r}"
    return int(named[port])


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in _dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def _dashboard_expressions() -> list[str]:
    exprs = [t["expr"] for p in _dashboard_panels() for t in p.get("targets", []) if "expr" in t]
    for variable in _dashboard()["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    return tool


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (100m, 1, 128Mi, 1Gi) as a number."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# --- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate (test extra)")
    errors, validated = [], 0
    for path, doc in _manifests():
        where = f"{path.relative_to(ROOT)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_RESOURCES:
            continue  # no schema in the package: test_custom_resources_are_well_formed checks them
        try:
            utils.validate(doc, version, strict=True)
            validated += 1
        except utils.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except utils.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, "\n".join(errors)
    assert validated >= 6


def test_strict_validation_catches_a_misspelt_field() -> None:
    """So that the test above cannot pass by validating nothing."""
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate (test extra)")
    statefulset = copy.deepcopy(_of_kind("StatefulSet")[0])
    _indexer(statefulset)["livenessProbes"] = _indexer(statefulset).pop("livenessProbe")
    with pytest.raises(utils.ValidationError, match="livenessProbes"):
        utils.validate(statefulset, KUBERNETES_VERSIONS[-1], strict=True)


def test_custom_resources_are_well_formed() -> None:
    """PodMonitor and PrometheusRule, by hand (kubernetes-validate has no schema for them)."""
    (monitor,) = _of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {
        "selector",
        "podMetricsEndpoints",
        "namespaceSelector",
        "jobLabel",
        "podTargetLabels",
    }
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e["port"] == "metrics" and e.get("path", "/metrics") == "/metrics" for e in endpoints)
    for endpoint in endpoints:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}
    for workload in _workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"the PodMonitor does not select the pods of {_name(workload)}"
        _container_port(_indexer(workload), "metrics")
        for container in [*_pod_spec(workload).get("initContainers", []), *_pod_spec(workload)["containers"]]:
            if container["name"] != INDEXER_CONTAINER:
                assert "metrics" not in {p.get("name") for p in container.get("ports", [])}, container["name"]

    (rule,) = _of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "prometheusrule.yaml must carry the groups of deploy/prometheus/alerts.yaml, unchanged"
    )
    for doc in (monitor, rule):
        assert doc["metadata"]["name"] and set(doc) == {"apiVersion", "kind", "metadata", "spec"}


# --- kustomizations --------------------------------------------------------------------------


def _kustomize_resources(directory: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, str]]:
    """(kind, name) of everything a kustomization directory builds, following directories."""
    assert directory not in seen, f"kustomizations include each other: {[str(p) for p in seen]}"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    built: list[tuple[str, str]] = []
    for entry in [*kustomization.get("resources", []), *kustomization.get("components", [])]:
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory / 'kustomization.yaml'}: {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{entry}: a directory without kustomization.yaml"
            built.extend(_kustomize_resources(target, (*seen, directory)))
            continue
        docs = _yaml_documents(target)
        assert docs, f"{entry}: no document"
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{entry}: not a Kubernetes resource"
            built.append((doc["kind"], doc["metadata"]["name"]))
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            assert (directory / patch["path"]).is_file(), f"{directory}: patch {patch['path']} does not exist"
    return built


@pytest.mark.parametrize("kustomization", _kustomization_files(), ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_kustomization_lists_files_that_exist_and_parse(kustomization: Path) -> None:
    built = _kustomize_resources(kustomization.parent)
    assert built
    duplicates = sorted({item for item in built if built.count(item) > 1})
    assert not duplicates, f"built twice: {duplicates}"


def test_the_kustomizations_cover_every_manifest_but_the_examples() -> None:
    listed: set[Path] = set()
    for kustomization in _kustomization_files():
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            listed.add((kustomization.parent / entry).resolve())
    orphans = [p for p in _manifest_files() if p.resolve() not in listed and not p.name.endswith(".example.yaml")]
    assert not orphans, f"in no kustomization: {orphans}"
    assert (KUBERNETES / "kustomization.yaml").is_file()
    secrets = [p for p in _manifest_files() if any(d.get("kind") == "Secret" for d in _yaml_documents(p))]
    assert all(p.name.endswith(".example.yaml") for p in secrets), "Secrets belong in examples, never in a build"


def test_kustomize_builds_every_kustomization_when_available() -> None:
    if shutil.which("kustomize"):
        command = [str(shutil.which("kustomize")), "build"]
    elif shutil.which("kubectl"):
        command = [str(shutil.which("kubectl")), "kustomize"]
    else:
        pytest.skip("neither kustomize nor kubectl is on PATH")
    for kustomization in _kustomization_files():
        done = subprocess.run([*command, str(kustomization.parent)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{kustomization}: {done.stderr}"
        kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(done.stdout) if doc)
        assert sorted(kind for kind, _ in _kustomize_resources(kustomization.parent)) == kinds


# --- the pods against the code's settings ----------------------------------------------------


def test_indexer_variables_are_real_settings() -> None:
    primary, deprecated = _setting_variables()
    assert set(URL_VARIABLES) <= primary.keys()
    allowed = primary.keys() | {f"{name}_FILE" for name in URL_VARIABLES}
    for workload in _workloads():
        env = _environment(_indexer(workload))
        assert env, _name(workload)
        unknown = sorted(env.keys() - allowed - deprecated)
        assert not unknown, f"{_name(workload)}: not settings of indexer/config.py: {unknown}"
        old = sorted(env.keys() & deprecated)
        assert not old, f"{_name(workload)}: deprecated names, use the first variable of the setting: {old}"
        plain = sorted(env.keys() & set(URL_VARIABLES))
        assert not plain, f"{_name(workload)}: URLs carry passwords, give them as *_FILE from a Secret: {plain}"
    for name, data in _configmaps().items():
        unknown = sorted(data.keys() - allowed)
        assert not unknown, f"ConfigMap {name}: not settings of indexer/config.py: {unknown}"


def _secret_files(workload: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """mount path of each file of a secret volume in the indexer container → (secret, key)."""
    volumes = {v["name"]: v for v in _pod_spec(workload).get("volumes", [])}
    files: dict[str, tuple[str, str]] = {}
    for mount in _indexer(workload).get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        keys = [item["key"] for item in secret["items"]] if "items" in secret else _secrets()[secret["secretName"]]
        for key in keys:
            files[f"{mount['mountPath'].rstrip('/')}/{key}"] = (secret["secretName"], key)
    return files


def test_file_variables_name_files_of_a_mounted_secret_the_indexer_can_read() -> None:
    secrets = _secrets()
    for workload in _workloads():
        pod = _pod_spec(workload)
        env = _environment(_indexer(workload))
        files = _secret_files(workload)
        given = {name: path for name, path in env.items() if name.endswith("_FILE")}
        assert {"DATABASE_URL_FILE", "REDIS_URL_FILE", "AMQP_URL_FILE"} <= given.keys(), _name(workload)
        for name, path in given.items():
            assert path in files, f"{_name(workload)}: {name}={path} is no file of a mounted secret"
            secret, key = files[path]
            assert secret in secrets and key in secrets[secret], f"{secret}/{key} is not in secret.example.yaml"
        for volume in pod.get("volumes", []):
            if "secret" in volume and volume["name"] in {m["name"] for m in _indexer(workload)["volumeMounts"]}:
                mode = volume["secret"].get("defaultMode", 0o644)
                by_group = mode & 0o040 and "fsGroup" in pod.get("securityContext", {})
                assert mode & 0o004 or by_group, f"{_name(workload)}: uid {INDEXER_UID} cannot read {volume['name']}"
                assert not mode & 0o002, f"{_name(workload)}: {volume['name']} is world-writable"


def test_the_pods_configuration_is_accepted_by_the_indexer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The ConfigMap and the example Secret's files, loaded the way `mention-indexer run` loads them."""
    secrets = _secrets()
    primary, deprecated = _setting_variables()
    for workload in _workloads():
        for name in [*primary, *deprecated, *(f"{url}_FILE" for url in URL_VARIABLES)]:
            monkeypatch.delenv(name, raising=False)
        files = _secret_files(workload)
        for name, value in _environment(_indexer(workload)).items():
            if name.endswith("_FILE"):
                secret, key = files[value]
                local = tmp_path / workload["kind"] / key
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(secrets[secret][key] + "\n", encoding="utf-8")
                value = str(local)
            monkeypatch.setenv(name, value)
        settings = load_settings()
        assert settings.http_port != 0, f"{_name(workload)}: the probes need the HTTP server"
        if workload["kind"] == "StatefulSet":
            assert urlsplit(settings.database_url).hostname in ("localhost", "127.0.0.1"), (
                "the sidecar reaches the database of its own pod"
            )


def _configured(workload: dict[str, Any]) -> dict[str, Any]:
    """The indexer's settings that matter here: the ConfigMap's values, else the defaults."""
    env = _environment(_indexer(workload))
    primary, _ = _setting_variables()
    by_field = {field: env[variable] for variable, field in primary.items() if variable in env}
    return {
        field: type(info.default)(by_field[field]) if field in by_field else info.default
        for field, info in Settings.model_fields.items()
        if field in ("http_port", "shutdown_timeout_s", "prefetch", "max_message_bytes", "batch_messages")
    }


def test_probes_ask_healthz_and_readyz_on_the_configured_port() -> None:
    for workload in _workloads():
        container = _indexer(workload)
        port = _configured(workload)["http_port"]
        liveness, readiness = container["livenessProbe"], container["readinessProbe"]
        assert liveness["httpGet"]["path"] == "/healthz", _name(workload)
        assert readiness["httpGet"]["path"] == "/readyz", _name(workload)
        for probe in (liveness, readiness, container.get("startupProbe")):
            if probe is not None:
                assert _container_port(container, probe["httpGet"]["port"]) == port, _name(workload)
        if "startupProbe" in container:
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz", "/readyz needs Postgres: a deadlock"
        assert _container_port(container, "metrics") == port
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", _name(workload)
        assert annotations.get("prometheus.io/port") == str(port), _name(workload)
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics", _name(workload)


def test_the_grace_period_covers_the_shutdown() -> None:
    for workload in _workloads():
        grace = _pod_spec(workload)["terminationGracePeriodSeconds"]
        assert grace >= 10, f"{_name(workload)}: SIGTERM → exit 0 takes up to 10 s"
        assert grace >= _configured(workload)["shutdown_timeout_s"] + 1, _name(workload)


def test_the_indexer_runs_unprivileged_on_a_read_only_root() -> None:
    for workload in _workloads():
        pod_context = _pod_spec(workload).get("securityContext", {})
        context = {**pod_context, **_indexer(workload)["securityContext"]}
        assert context["runAsNonRoot"] is True, _name(workload)
        assert context["runAsUser"] == INDEXER_UID, _name(workload)
        assert context["readOnlyRootFilesystem"] is True, _name(workload)
        assert context["allowPrivilegeEscalation"] is False, _name(workload)
        assert context["capabilities"]["drop"] == ["ALL"], _name(workload)
        assert _pod_spec(workload)["automountServiceAccountToken"] is False, _name(workload)


def test_the_indexer_has_requests_and_limits() -> None:
    for workload in _workloads():
        resources = _indexer(workload)["resources"]
        for kind in ("cpu", "memory"):
            assert _quantity(resources["requests"][kind]) <= _quantity(resources["limits"][kind]), _name(workload)
        configured = _configured(workload)
        assert configured["prefetch"] >= configured["batch_messages"]


def test_the_sidecar_layout() -> None:
    (statefulset,) = _of_kind("StatefulSet")
    pod = _pod_spec(statefulset)
    sidecar = _indexer(statefulset)
    assert sidecar in pod["initContainers"] and sidecar["restartPolicy"] == "Always", "a native sidecar"
    assert [c["name"] for c in pod["containers"]] == ["postgres"]
    (service,) = [s for s in _of_kind("Service") if s["metadata"]["name"] == statefulset["spec"]["serviceName"]]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is True, "the indexer's readiness must not hide the database"


def test_the_replicas_variant() -> None:
    (deployment,) = _of_kind("Deployment")
    container = _indexer(deployment)
    assert container in _pod_spec(deployment)["containers"] and "restartPolicy" not in container
    assert deployment["spec"]["replicas"] >= 2
    (budget,) = _of_kind("PodDisruptionBudget")
    assert (
        budget["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


# --- metric names ----------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _metric_names(expr: str) -> set[str]:
    return {m for m in _IDENTIFIER.findall(expr) if "indexer" in m}


def _check_expression(expr: str, where: str) -> list[str]:
    problems = []
    for name in _metric_names(expr):
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
                base = name.removesuffix(suffix)
                if METRICS[base] != "histogram":
                    problems.append(f"{where}: {name}: {base} is a {METRICS[base]}, not a histogram")
        if base not in METRICS:
            problems.append(f"{where}: unknown metric {name}")
    for label, value in re.findall(r'\b(outcome|reason|dependency)\s*=~?\s*"([^"]*)"', expr):
        for one in value.split("|"):
            if not one.startswith("$") and one not in LABEL_VALUES[label]:
                problems.append(f"{where}: {label}={one!r} is not one of {sorted(LABEL_VALUES[label])}")
    return problems


def test_alerts_and_dashboard_use_only_the_exported_metric_names() -> None:
    problems = []
    for rule in _alert_rules():
        assert _metric_names(rule["expr"]), f"{rule['alert']} uses no indexer metric"
        problems += _check_expression(rule["expr"], rule["alert"])
    for expr in _dashboard_expressions():
        problems += _check_expression(expr, "dashboard")
    assert not problems, "\n".join(problems)


def test_the_metric_names_are_what_the_code_exports() -> None:
    """Once indexer/metrics.py exports the mention_indexer_* names, they must be exactly these."""
    from indexer import metrics as metrics_module

    try:
        registry = metrics_module.Metrics().registry
    except TypeError as exc:
        pytest.skip(f"indexer.metrics.Metrics() needs arguments now: {exc}")
    exported = {}
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        exported[name] = family.type
    if not any(name.startswith("mention_indexer_") for name in exported):
        pytest.skip("indexer/metrics.py does not export the mention_indexer_* names yet")
    ours = {name: kind for name, kind in exported.items() if name.startswith("mention_indexer_")}
    assert ours == METRICS


# --- alert rules -----------------------------------------------------------------------------


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]
        assert rule["annotations"]["runbook"] == f"docs/production.md#{rule['alert'].lower()}"
    used = " ".join(rule["expr"] for rule in rules)
    for needed in (
        "mention_indexer_lag_seconds",
        "mention_indexer_dead_letters_total",
        "mention_indexer_ready",
        "mention_indexer_consumer_registered",
        "mention_indexer_dependency_up",
    ):
        assert needed in used, f"no alert on {needed}"


def test_promtool_accepts_the_alert_rules() -> None:
    done = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    done = subprocess.run([_promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for t in case["alert_rule_test"]
    }
    assert tested == {rule["alert"] for rule in _alert_rules()}, "every alert has a unit test"


def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    tool = _promtool()
    rules = []
    for index, expr in enumerate(_dashboard_expressions()):
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        expr = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query{index}", "expr": expr})
    file = tmp_path / "dashboard-queries.yaml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([tool, "check", "rules", str(file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- dashboard -------------------------------------------------------------------------------


def test_the_dashboard_has_the_panels_an_operator_looks_at_first() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "mention-indexer" and dashboard["title"]
    panels = [p for p in _dashboard_panels() if p["type"] != "row"]
    ids = [p["id"] for p in _dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    exprs = " ".join(_dashboard_expressions())
    for wanted in (
        "mention_indexer_ready",
        "mention_indexer_consumer_registered",
        "mention_indexer_dependency_up",
        "sum by (outcome) (rate(mention_indexer_messages_total",
        "histogram_quantile(0.5, sum by (le) (rate(mention_indexer_lag_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(mention_indexer_lag_seconds_bucket",
        "sum by (reason) (increase(mention_indexer_dead_letters_total",
        "mention_indexer_batch_duration_seconds_bucket",
        "mention_indexer_batch_messages_bucket",
        "sum by (dependency) (rate(mention_indexer_retries_total",
        "mention_indexer_seconds_since_last_delivery",
    ):
        assert wanted in exprs, f"no panel shows {wanted}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


# --- the Dockerfile's health check -----------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_health_check_is_the_liveness_script() -> None:
    instructions = _dockerfile_instructions()
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "python" and len(command) == 2
    copies = [args.split() for op, args in instructions if op == "COPY"]
    assert ["deploy/healthcheck.py", command[1]] in copies, "the script the health check runs is copied in"
    assert "/readyz" not in healthcheck
    users = [args for op, args in instructions if op == "USER"]
    assert users[-1].split(":")[0] == str(INDEXER_UID)
    assert "INDEXER_HTTP_PORT" in HEALTHCHECK.read_text()


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_check_default_port_is_the_settings_default() -> None:
    assert _load_healthcheck().DEFAULT_PORT == Settings.model_fields["http_port"].default


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str]

    def do_GET(self) -> None:
        self.paths.append(self.path)
        body = b'{"status":"ok"}'
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_answering() -> Iterator[tuple[int, type[_Answer]]]:
    handler = type("Handler", (_Answer,), {"paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _run_healthcheck(port: str | None) -> int:
    env = {"PATH": os.environ.get("PATH", "")}
    if port is not None:
        env["INDEXER_HTTP_PORT"] = port
    done = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    return done.returncode


def test_health_check_asks_healthz_on_the_configured_port(http_answering: tuple[int, type[_Answer]]) -> None:
    port, handler = http_answering
    assert _run_healthcheck(str(port)) == 0
    assert handler.paths == ["/healthz"]
    handler.status = 500
    assert _run_healthcheck(str(port)) == 1


def test_health_check_fails_when_nothing_answers() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert _run_healthcheck(str(free)) == 1
    assert _run_healthcheck("not-a-port") == 1


def test_health_check_without_http_server_is_healthy_while_pid_1_lives() -> None:
    assert _run_healthcheck("0") == 0


# --- the production guide --------------------------------------------------------------------


def _anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


AUDIT_METRICS = {
    "mention_indexer_audit_checked_total": "counter",
    "mention_indexer_audit_differences_total": "counter",
    "mention_indexer_audit_consistency_ratio": "gauge",
    "mention_indexer_audit_in_flight_total": "counter",
    "mention_indexer_audit_failures_total": "counter",
}


def test_the_continuous_audit_adds_exactly_its_metrics_and_the_guide_describes_them() -> None:
    from indexer import metrics as metrics_module

    metrics = metrics_module.Metrics()
    metrics.audit()
    exported = {
        f"{family.name}_total" if family.type == "counter" else family.name: family.type
        for family in metrics.registry.collect()
    }
    assert {name: kind for name, kind in exported.items() if name not in METRICS} == AUDIT_METRICS
    text = PRODUCTION_DOC.read_text(encoding="utf-8")
    assert not [name for name in AUDIT_METRICS if f"`{name}`" not in text]


def test_the_production_guide_covers_metrics_alerts_and_readiness_problems() -> None:
    text = PRODUCTION_DOC.read_text(encoding="utf-8")
    missing = [name for name in METRICS if f"`{name}" not in text]
    assert not missing, f"docs/production.md does not describe {missing}"
    anchors = _anchors(text)
    for rule in _alert_rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in anchors, f"docs/production.md has no heading for {rule['alert']} (#{anchor})"
    for problem in READINESS_PROBLEMS:
        assert f"`{problem}`" in text, f"docs/production.md does not explain the readiness problem {problem!r}"
    for values in LABEL_VALUES.values():
        for value in values:
            assert f"`{value}`" in text, f"docs/production.md does not explain the label value {value!r}"
