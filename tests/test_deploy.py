"""The deployment files agree with the settings: every key in deploy/tally.toml is a known setting,
every role runs ``tally serve --role X`` on the configured port, and the engines' hosts, ports,
credentials and durability match what the settings point at (docker-compose and Kubernetes)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tally.settings import Settings, load, region_peers

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROLES = ("api", "relay", "aggregator")


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load(DEPLOY / "tally.toml", env={})  # rejects unknown keys and invalid values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services: dict[str, Any] = doc["services"]
    return services


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return [d for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def hosts_of(url: str) -> list[tuple[str, int]]:
    """(host, port) of every server a URL names: a multi-host DSN, or a comma-separated list."""
    out = []
    for one in url.split(","):
        netloc = urlsplit(one if "//" in one else f"//{one}").netloc
        host, _, port = netloc.rpartition("@")[2].partition(":")
        out.append((host, int(port.split("/")[0])))
    return out


def dsn_hosts(dsn: str) -> list[tuple[str, int]]:
    parts = urlsplit(dsn)
    return hosts_of(",".join(f"//{h}" for h in parts.netloc.rpartition("@")[2].split(",")))


def engine_endpoints(s: Settings) -> dict[str, int]:
    """host -> port of every engine the settings name."""
    hosts: dict[str, int] = {}
    for dsn in s.postgres_dsns:
        hosts.update(dsn_hosts(dsn))
    hosts.update(hosts_of(s.nats_url))
    hosts.update(hosts_of(s.redis_url))
    return hosts


def test_settings_file_is_a_valid_cluster_config(settings: Settings) -> None:
    raw = tomllib.loads((DEPLOY / "tally.toml").read_text())["tally"]
    assert set(raw) <= {f for f in Settings.__dataclass_fields__}
    assert settings.backend == "cluster" and settings.host == "0.0.0.0"
    assert len(settings.postgres_dsns) == 2 and settings.postgres_synchronous_commit == "on"
    for dsn in settings.postgres_dsns:  # both members of the shard, the primary found by the driver
        assert len(dsn_hosts(dsn)) == 2 and urlsplit(dsn).query == "target_session_attrs=read-write"
    assert settings.nats_replicas == len(hosts_of(settings.nats_url)) == 3


def test_compose_roles_run_serve_with_the_config(compose: dict[str, Any], settings: Settings) -> None:
    for role in ROLES:
        svc = compose[role]
        assert svc["command"] == ["tally", "serve", "--role", role]
        config = svc["environment"]["TALLY_CONFIG"]
        assert f"./tally.toml:{config}:ro" in svc["volumes"]
        assert set(svc["depends_on"]) == set(engine_endpoints(settings))
    assert compose["api"]["ports"] == [f"8080-8081:{settings.port}"]
    assert compose["api"]["deploy"]["replicas"] == 2 and compose["aggregator"]["deploy"]["replicas"] == 2


def test_compose_engines_match_the_settings(compose: dict[str, Any], settings: Settings) -> None:
    patroni = yaml.safe_load((DEPLOY / "patroni.yml").read_text())
    dcs = patroni["bootstrap"]["dcs"]
    assert dcs["synchronous_mode"] is True
    assert patroni["postgresql"]["parameters"]["synchronous_commit"] == \
        settings.postgres_synchronous_commit
    scopes = set()
    for dsn in settings.postgres_dsns:
        parts = urlsplit(dsn)
        envs = [compose[host]["environment"] for host, port in dsn_hosts(dsn)]
        assert {e["PATRONI_SCOPE"] for e in envs} == {envs[0]["PATRONI_SCOPE"]}  # one shard
        scopes.add(envs[0]["PATRONI_SCOPE"])
        for (host, port), env in zip(dsn_hosts(dsn), envs, strict=True):
            assert port == 5432 and env["PATRONI_NAME"] == host
            assert (env["PATRONI_SUPERUSER_USERNAME"], env["PATRONI_SUPERUSER_PASSWORD"]) == (
                parts.username, parts.password)
    assert len(scopes) == len(settings.postgres_dsns)
    for host in patroni["etcd3"]["hosts"]:
        assert host.split(":")[0] in compose
    nats_conf = (DEPLOY / "nats.conf").read_text()
    assert "sync_interval: always" in nats_conf
    for host, port in hosts_of(settings.nats_url):
        assert f"listen: 0.0.0.0:{port}" in nats_conf and f'"nats://{host}:6222"' in nats_conf
        assert "./nats.conf:/etc/nats/nats.conf:ro" in compose[host]["volumes"]
    redis = compose[urlsplit(settings.redis_url).hostname or ""]["command"]
    assert redis[redis.index("--port") + 1] == str(urlsplit(settings.redis_url).port)
    assert redis[redis.index("--appendonly") + 1] == "yes" and "--appendfsync" in redis


def test_k8s_config_map_carries_the_same_files(k8s: list[dict[str, Any]]) -> None:
    maps = by_kind(k8s, "ConfigMap")
    assert tomllib.loads(maps["tally-config"]["data"]["tally.toml"]) == tomllib.loads(
        (DEPLOY / "tally.toml").read_text())
    assert maps["nats-config"]["data"]["nats.conf"].strip() == (DEPLOY / "nats.conf").read_text().strip()
    assert maps["patroni-config"]["data"]["patroni.yml"].strip() == \
        (DEPLOY / "patroni.yml").read_text().strip()


def test_k8s_roles_run_serve_on_the_configured_port(k8s: list[dict[str, Any]],
                                                    settings: Settings) -> None:
    deployments = by_kind(k8s, "Deployment")
    assert set(deployments) == {f"tally-{r}" for r in ROLES}
    for role in ROLES:
        pod = deployments[f"tally-{role}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["tally", "serve", "--role", role]
        assert [p["containerPort"] for p in container["ports"]] == [settings.port]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": settings.port}
        assert {"name": "TALLY_CONFIG", "value": "/etc/tally/tally.toml"} in container["env"]
        assert pod["volumes"][0]["configMap"]["name"] == "tally-config"
    api = by_kind(k8s, "Service")["api"]["spec"]
    assert api["selector"] == {"app": "tally", "role": "api"}
    assert api["ports"][0]["targetPort"] == settings.port


def test_k8s_services_reach_every_engine_the_settings_name(k8s: list[dict[str, Any]],
                                                           settings: Settings) -> None:
    services = by_kind(k8s, "Service")
    for host, port in engine_endpoints(settings).items():
        assert host in services, f"no Service named {host}"
        assert port in [p["port"] for p in services[host]["spec"]["ports"]]
    password = by_kind(k8s, "Secret")["postgres"]["stringData"]["password"]
    assert {urlsplit(d).password for d in settings.postgres_dsns} == {password}
    sets = by_kind(k8s, "StatefulSet")
    for db in range(len(settings.postgres_dsns)):  # a primary and a standby per shard
        assert sets[f"pg{db}"]["spec"]["replicas"] == 2
    assert sets["nats"]["spec"]["replicas"] == settings.nats_replicas
    assert sets["etcd"]["spec"]["replicas"] == 3
    redis_args = sets["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


@pytest.mark.parametrize("region", ["us", "eu"])
def test_region_examples_load_and_name_each_other(region: str) -> None:
    s = load(DEPLOY / "regions" / f"{region}.toml", env={})
    other = "eu" if region == "us" else "us"
    assert s.region_name == region and list(region_peers(s)) == [other]
    conf = (DEPLOY / "regions" / f"nats-{region}.conf").read_text()
    assert f"domain: {region}" in conf


@pytest.mark.parametrize("region", ["us", "eu", "ap"])
def test_three_region_examples_are_leaves_of_a_hub_outside_the_regions(region: str) -> None:
    three = DEPLOY / "regions" / "three"
    s = load(three / f"{region}.toml", env={})
    assert s.region_name == region
    assert sorted(region_peers(s)) == sorted({"us", "eu", "ap"} - {region})
    conf = (three / f"nats-{region}.conf").read_text()
    assert f"domain: {region}" in conf and "nats.witness.internal:7422" in conf
    hub = (three / "nats-hub.conf").read_text()
    assert "jetstream {" not in hub and "listen: 0.0.0.0:7422" in hub  # no data, no domain
