"""The Kubernetes manifests (k8s/, k8s/examples/), validated offline, and the numbers in them
checked against each other and against the service's own settings (docs/SCALING.md).

Built-in kinds are validated by kubernetes-validate in strict mode (unknown fields refused)
against the schemas it ships for KUBERNETES_VERSION. The operators' kinds (CloudNativePG
`Cluster`, OT-Container-Kit `RedisCluster`) are validated against their CRDs' own openAPIV3Schema,
vendored cut down in k8s/schemas/ (where from and how: k8s/schemas/prune_crd.py), made strict
the same way, with their metadata checked as ObjectMeta.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from referencing import Registry, Resource

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory_svc.config import Settings
from inventory_svc.embedded import EmbeddedRedis
from inventory_svc.embedded.cluster import EmbeddedRedisCluster
from tests.conftest import Stores, settings_for, uid
from tests.faults.harness import check_all, fresh_database, make_world, running

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# The newest Kubernetes minor kubernetes-validate ships schemas for at the version pinned in
# pyproject.toml, and the oldest still supported upstream at the time of writing.
KUBERNETES_VERSIONS = ("1.37", "1.35")
Doc = dict[str, Any]


def manifests() -> Iterator[tuple[str, Doc]]:
    for path in sorted(K8S.glob("*.yaml")) + sorted((K8S / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield f"{path.relative_to(REPO)}:{doc['kind']}/{doc['metadata']['name']}", doc


DOCS = dict(manifests())


def one(kind: str, name: str | None = None) -> Doc:
    found = [d for d in DOCS.values()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} manifests"
    return found[0]


# ---- validation ----------------------------------------------------------------------------
@cache
def crd_schemas() -> dict[tuple[str, str], Doc]:
    out = {}
    for path in sorted((K8S / "schemas").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[(doc["apiVersion"], doc["kind"])] = strict(doc["openAPIV3Schema"])
    return out


def strict(schema: Any) -> Any:
    """An object schema with properties and nothing said about others refuses unknown fields
    (the API server's strict field validation)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k != "properties" else {n: strict(s) for n, s in v.items()}
           for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def object_meta(version: str) -> jsonschema.Draft202012Validator:
    """ObjectMeta from kubernetes-validate's strict definitions for this Kubernetes version."""
    base = resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json")
    definitions = json.loads(base.read_text())
    registry: Registry = Resource.from_contents(definitions) @ Registry()
    meta = {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": "https://kubernetes.io/api/_definitions.json"
                    "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(meta, registry=registry)


def validate(doc: Doc, version: str) -> None:
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    jsonschema.Draft202012Validator(schema).validate(doc)
    object_meta(version).validate(doc["metadata"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(DOCS))
def test_manifest_is_valid(name: str, version: str) -> None:
    validate(DOCS[name], version)


def test_every_kind_has_a_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in DOCS.values()}
    assert ("postgresql.cnpg.io/v1", "Cluster") in kinds
    assert ("redis.redis.opstreelabs.in/v1beta2", "RedisCluster") in kinds
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "Secret"} <= {k for _, k in kinds}


@pytest.mark.parametrize(("kind", "path", "value"), [
    ("Deployment", ["spec", "template", "spec", "topologySpreadConstraint"], []),  # a typo
    ("Deployment", ["spec", "replicas"], "three"),
    ("PodDisruptionBudget", ["spec", "maxUnavailabe"], 1),
    ("Cluster", ["spec", "instance"], 3),
    ("Cluster", ["spec", "postgresql", "synchronous", "method"], None),
    ("Cluster", ["spec", "bootstrap", "initdb", "secret", "nmae"], "x"),
    ("RedisCluster", ["spec", "clusterSize"], "3"),
    ("RedisCluster", ["spec", "kubernetesConfig", "redisSecret", "keyy"], "password"),
    ("RedisCluster", ["metadata", "labelz"], {}),
])
def test_validation_refuses_a_broken_manifest(kind: str, path: list[str], value: Any) -> None:
    """Not vacuous: a misspelt field, a wrong type, a required field removed each fail."""
    doc = copy.deepcopy(one(kind))
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, KUBERNETES_VERSIONS[0])


# ---- the numbers agree ------------------------------------------------------------------------
def container() -> Doc:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "inventory-svc")


def env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["env"] if "value" in e}


def cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_cpu_and_memory_follow_the_workers() -> None:
    """One worker = one core's event loop: CPU request = limit = workers (more workers than the
    limit share its quota and add throttling to every call); memory per worker."""
    workers = int(env()["INVENTORY_WORKERS"])
    res = container()["resources"]
    assert cpu(res["requests"]["cpu"]) == cpu(res["limits"]["cpu"]) == workers
    assert mebibytes(res["requests"]["memory"]) >= 512 * workers
    assert mebibytes(res["limits"]["memory"]) >= 1024 * workers


def test_deployment_env_is_valid_settings(tmp_path: Path) -> None:
    """Every INVENTORY_ variable the Deployment sets is a setting the service knows, with a
    value it accepts (files replaced by stand-ins; the principals file is the example's)."""
    values = dict(env(), INVENTORY_REDIS_URL="redis://inventory:x@redis:6379/0",
                  INVENTORY_DATABASE_URL="postgresql://inventory:x@pg:5432/inventory")
    principals = one("Secret", "inventory-svc-principals")["stringData"]["principals.toml"]
    for name in ("INVENTORY_TLS_CERT", "INVENTORY_TLS_KEY", "INVENTORY_TLS_CLIENT_CA",
                 "INVENTORY_PRINCIPALS_FILE"):
        stand_in = tmp_path / name
        stand_in.write_text(principals.replace("CHANGE-ME-64-hex-digits", "ab" * 32))
        values[name] = str(stand_in)
    known = {"INVENTORY_" + f.upper() for f in Settings.__dataclass_fields__}
    assert not {k for k in values if k.startswith("INVENTORY_")} - known
    settings = Settings.from_env(values)
    # the age limit moves clients to new pods within minutes; its grace lets the longest call
    # (an import) finish on the old connection
    assert settings.max_connection_age_s <= 600
    assert settings.max_connection_age_grace_s >= settings.import_timeout_s


def pod_labels() -> dict[str, str]:
    return dict(one("Deployment")["spec"]["template"]["metadata"]["labels"])


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions In/NotIn/Exists) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def test_service_is_headless_and_reaches_the_pods() -> None:
    """Headless: DNS names every ready pod, so round_robin clients spread their calls (a
    ClusterIP pins each connection to one pod)."""
    svc = one("Service", "inventory-svc")["spec"]
    assert svc["clusterIP"] == "None"
    assert selects({"matchLabels": svc["selector"]}, pod_labels())
    ports = {p["name"] for p in container()["ports"]}
    assert all(p["targetPort"] in ports for p in svc["ports"])


def test_autoscaler_disruption_budget_and_spread_cover_the_pods() -> None:
    deployment = one("Deployment")
    hpa, pdb = one("HorizontalPodAutoscaler")["spec"], one("PodDisruptionBudget")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 3 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    assert selects(pdb["selector"], pod_labels())
    # one pod at a time, at any count (minAvailable would allow most of them to go at once)
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname",
                                                  "topology.kubernetes.io/zone"}
    assert all(selects(c["labelSelector"], pod_labels()) for c in spread)
    # a rollout never takes a pod away before its successor is ready
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_postgres_takes_every_pod_at_the_most() -> None:
    """Each worker holds up to PG_POOL_MAX connections and one for the leader election; the
    HPA's largest count of pods must fit the example Cluster's max_connections, with room for
    superusers (3 reserved by default) and the operator's and replication's own."""
    e = env()
    per_pod = int(e["INVENTORY_WORKERS"]) * (int(e["INVENTORY_PG_POOL_MAX"]) + 1)
    most = one("HorizontalPodAutoscaler")["spec"]["maxReplicas"] * per_pod
    allowed = int(one("Cluster")["spec"]["postgresql"]["parameters"]["max_connections"])
    assert most + 3 + 20 <= allowed, (most, allowed)


def test_secret_wires_the_example_stores() -> None:
    """The service's Secret names the example stores: the Cluster's primary Service with its
    owner and database, a RedisCluster node with the ACL user made for the service."""
    deployment_env_from = container()["envFrom"]
    secret = one("Secret", "inventory-svc")
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in deployment_env_from
    urls = secret["stringData"]
    assert env()["INVENTORY_REDIS_CLUSTER"] == "true"

    cluster = one("Cluster")
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    owner = one("Secret", initdb["secret"]["name"])
    assert owner["type"] == "kubernetes.io/basic-auth"
    assert owner["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    db = urlsplit(urls["INVENTORY_DATABASE_URL"])
    assert db.hostname == f"{cluster['metadata']['name']}-rw.{cluster['metadata']['namespace']}.svc"
    assert db.username == initdb["owner"] == owner["stringData"]["username"]
    assert db.path == "/" + initdb["database"]

    rc = one("RedisCluster")
    rd = urlsplit(urls["INVENTORY_REDIS_URL"])
    assert rd.hostname == f"{rc['metadata']['name']}-leader.{rc['metadata']['namespace']}.svc"
    assert rd.path == "/0"  # a cluster has database 0 only
    acl = one("Secret", rc["spec"]["acl"]["secret"]["secretName"])["stringData"]["user.acl"]
    users = {line.split()[1]: line for line in acl.splitlines() if line.startswith("user ")}
    assert rd.username in users and "default" in users
    admin = rc["spec"]["kubernetesConfig"]["redisSecret"]
    password = one("Secret", admin["name"])["stringData"][admin["key"]]
    assert f">{password}" in users["default"].split()  # the operator's password, not nopass


def test_network_policy_reaches_the_example_stores() -> None:
    """The egress rules select the pods the operators make, in the stores' namespace."""
    egress = one("NetworkPolicy")["spec"]["egress"]
    cluster, rc = one("Cluster"), one("RedisCluster")

    def reached(namespace: str, labels: dict[str, str], port: int) -> bool:
        ns_labels = {"kubernetes.io/metadata.name": namespace}
        return any(
            any(p["port"] == port for p in rule["ports"]) and any(
                selects(peer.get("namespaceSelector", {}), ns_labels)
                and selects(peer.get("podSelector", {}), labels) for peer in rule["to"])
            for rule in egress)

    pg_ns, rd_ns = cluster["metadata"]["namespace"], rc["metadata"]["namespace"]
    assert reached(pg_ns, {"cnpg.io/cluster": cluster["metadata"]["name"],
                           "cnpg.io/instanceRole": "primary"}, 5432)
    for role in ("leader", "follower"):
        assert reached(rd_ns, {"app": f"{rc['metadata']['name']}-{role}", "role": role,
                               "redis_setup_type": "cluster"}, 6379)


# ---- the example Redis user can do the service's work ------------------------------------------
def example_redis_user() -> tuple[str, list[str]]:
    """The service's user name (from its Secret's URL) and its ACL rules (from the example)."""
    rc = one("RedisCluster")
    acl = one("Secret", rc["spec"]["acl"]["secret"]["secretName"])["stringData"]["user.acl"]
    user = str(urlsplit(one("Secret", "inventory-svc")["stringData"]["INVENTORY_REDIS_URL"])
               .username)
    line = next(x for x in acl.splitlines() if x.startswith(f"user {user} "))
    return user, [">pw" if r.startswith(">") else r for r in line.split()[2:]]


@contextlib.contextmanager
def redis_servers(topology: str, root: Path) -> Iterator[tuple[list[redis.Redis], str]]:
    """Admin clients of every node, and a URL without credentials: a standalone Valkey, or a
    Redis Cluster of three masters (the example's topology)."""
    if topology == "cluster":
        cluster = EmbeddedRedisCluster(root / "cluster", masters=3)
        try:
            url = cluster.start()
            yield [n.client() for n in cluster.nodes], url
        finally:
            cluster.stop()
    else:
        server = EmbeddedRedis(root / "redis", durable=False)
        try:
            url = server.start()
            yield [redis.Redis.from_url(url)], url
        finally:
            server.stop()


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
async def test_example_redis_acl_lets_the_service_work(
        stores: Stores, data_dir: Path, topology: str) -> None:
    """The ACL of k8s/examples/redis-cluster.yaml: under its user the service starts (cluster
    topology discovery included), reserves, commits, releases, rebuilds a flushed Redis and
    reconciles with it, with no command refused; other keys and admin commands are refused."""
    username, rules = example_redis_user()
    with redis_servers(topology, data_dir) as (admins, base):
        for admin in admins:
            admin.execute_command("ACL", "SETUSER", username, "reset", *rules)
        parts = urlsplit(base)
        url = f"redis://{username}:pw@{parts.hostname}:{parts.port}/0"
        settings = settings_for(stores, redis_url=url, redis_cluster=topology == "cluster",
                                database_url=await fresh_database(stores.database_url))
        async with running(settings) as (svc, stub, _):
            w = await make_world(stub, locations=1, skus=4, on_hand=10)
            loc = w.locations[0]
            for sku in w.skus:
                res = await stub.Reserve(api.ReserveRequest(lines=[
                    pb.ReservationLine(sku=sku, location_id=loc, quantity=2)]))
                await stub.CommitReservation(api.CommitReservationRequest(
                    reservation_id=res.reservation.id, idempotency_key=uid("c")))
                res = await stub.Reserve(api.ReserveRequest(lines=[
                    pb.ReservationLine(sku=sku, location_id=loc, quantity=1)]))
                await stub.ReleaseReservation(api.ReleaseReservationRequest(
                    reservation_id=res.reservation.id))
            for admin in admins:  # Redis lost: the generation check rebuilds it
                with contextlib.suppress(redis.exceptions.ReadOnlyError):
                    admin.flushall()
            assert (await svc.reconciler.run_pass()).rebuilt
            await svc.reconciler.run_pass()
            await check_all(svc.ctx.pg.pool, svc.ctx.redis.client, w.skus)
            refused = [e for admin in admins for e in admin.execute_command("ACL", "LOG")]
            assert not refused, f"the service was refused: {refused}"
            client = svc.ctx.redis.client
            with pytest.raises(redis.exceptions.NoPermissionError):
                await client.set("not-ours", "x")
        as_user = redis.Redis(host=parts.hostname, port=parts.port, username=username,
                              password="pw")
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_user.config_get("maxmemory")
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_user.acl_list()
        as_user.close()
        for admin in admins:
            admin.close()
