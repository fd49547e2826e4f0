"""Deployment files agree with Kubernetes, with each other and with psctl.

Nothing here needs Docker or a cluster. The Kubernetes manifests are validated offline
against the schemas bundled in kubernetes-validate; everything else is cross-checked:
selectors and ports, probes, ConfigMap/Secret references, and above all the psctl command
lines, which are rendered the way Kubernetes, sh, compose and systemd would render them and
then parsed by psctl's own argparse parser. A manifest that uses a flag psctl lacks, or a
ConfigMap value psctl refuses, fails here instead of in a CrashLoopBackOff.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shardps.pscommon import roles as psroles
from shardps.pscommon.security import token_digest
from shardps.psctl.cli import UsageError, build_parser, job_from_args, security_from_args
from shardps.psserver.daemon import ServerConfig
from shardps.scheduler.daemon import SchedulerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_DIR = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SYSTEMD = DEPLOY / "systemd"
ENV_EXAMPLE = SYSTEMD / "shardps.env.example"
DOCS = ROOT / "docs" / "deploy.md"

# The oldest Kubernetes whose schemas every kubernetes-validate>=1.30 (pyproject's dev extra)
# bundles; native gRPC probes have been GA since 1.27, so the manifests need nothing newer.
K8S_VERSION = "1.30.0"
IMAGE = "shardps:0.1.0"
RUN_AS = 10001
HEALTH = {"scheduler": "shardps.pscommon.wire.v1.Scheduler", "server": "shardps.pscommon.wire.v1.ParameterServer"}
ROLES = ("scheduler", "server", "worker")
# The final checkpoint of a large shard to a network volume comes on top of the RPC drain.
CHECKPOINT_MARGIN_S = 60
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component")


# --------------------------------------------------------------------------- psctl's parser

def psctl_options() -> tuple[set[str], dict[str, set[str]]]:
    """(top-level options, {subcommand: its option strings}) from psctl's argparse parser."""
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return (set(ap._option_string_actions),
            {name: set(p._option_string_actions) for name, p in sub.choices.items()})


def split_invocation(argv: list[str]) -> tuple[str, list[str]]:
    """psctl's argv (without 'psctl') -> (subcommand, its arguments), past --log-level."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] else 2
    assert i < len(argv), f"no subcommand in psctl {argv}"
    return argv[i], argv[i + 1:]


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def parse(argv: list[str], where: str) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except UsageError as exc:
        pytest.fail(f"{where}: psctl {shlex.join(argv)}\n  is refused by psctl: {exc}")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --------------------------------------------------------------------------- Kubernetes

def load_k8s(include_examples: bool = True) -> list[tuple[str, dict]]:
    files = sorted(K8S_DIR.glob("*.yaml"))
    if include_examples:
        files += sorted((K8S_DIR / "examples").glob("*.yaml"))
    docs = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                docs.append((str(f.relative_to(ROOT)), doc))
    return docs


K8S = load_k8s()
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def of_kind(*kinds: str) -> list[dict]:
    return [d for _, d in K8S if d["kind"] in kinds]


def workloads() -> list[dict]:
    return of_kind(*WORKLOAD_KINDS)


def workload(component: str) -> dict:
    found = [w for w in workloads()
             if w["spec"]["template"]["metadata"]["labels"].get(LABELS[1]) == component]
    assert len(found) == 1, f"expected one {component} workload, found {len(found)}"
    return found[0]


def containers(w: dict) -> list[dict]:
    spec = w["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def named(kind: str, name: str) -> dict | None:
    return next((d for _, d in K8S if d["kind"] == kind and d["metadata"]["name"] == name), None)


def container_ports(w: dict) -> list[dict]:
    return [p for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]


def port_of(w: dict, ref) -> int | None:
    """A port by name or number -> the declared containerPort, or None."""
    for p in container_ports(w):
        if ref == p.get("name") or ref == p["containerPort"]:
            return p["containerPort"]
    return None


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def k8s_invocation(c: dict) -> tuple[str, list[str]]:
    """('psctl' | 'sh', raw argv after psctl or the sh script) as the container would run it."""
    cmd = list(c.get("command") or ["psctl"]) + list(c.get("args") or [])  # image ENTRYPOINT psctl
    if cmd[0] == "psctl":
        return "psctl", cmd[1:]
    assert cmd[:2] == ["sh", "-c"] and len(cmd) == 3, f"container {c['name']}: psctl or sh -c 'exec psctl ...'"
    words = shlex.split(cmd[2])
    # exec: psctl replaces the shell as PID 1, so SIGTERM reaches it and it can drain
    assert words[:2] == ["exec", "psctl"], f"container {c['name']}: the script must `exec psctl`"
    return "sh", words[2:]


POD_NAMESPACE = "ns-test"
ORDINAL = 3  # not 0 or 1: a fixed --shard-id would not survive the comparison below


def pod_name(w: dict) -> str:
    return f"{w['metadata']['name']}-{ORDINAL}" if w["kind"] == "StatefulSet" else f"{w['metadata']['name']}-abc12"


def container_env(w: dict, c: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it (downward API with test values)."""
    env: dict[str, str] = {"HOSTNAME": pod_name(w)}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(named("ConfigMap", src["configMapRef"]["name"])["data"])
        if "secretRef" in src:
            env.update(named("Secret", src["secretRef"]["name"]).get("stringData", {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand_k8s(e["value"], env)
            continue
        ref = e["valueFrom"]
        if "fieldRef" in ref:
            env[e["name"]] = {"metadata.name": pod_name(w), "metadata.namespace": POD_NAMESPACE}[
                ref["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in ref:
            env[e["name"]] = named("ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            env[e["name"]] = named("Secret", ref["secretKeyRef"]["name"])["stringData"][ref["secretKeyRef"]["key"]]
    return env


def expand_k8s(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args: $$ escapes, unknown names stay as is."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@pytest.fixture(scope="module")
def fake_psctl(tmp_path_factory):
    """A `psctl` on PATH that records its argv as JSON, to run the manifests' sh scripts."""
    bindir = tmp_path_factory.mktemp("bin")
    script = bindir / "psctl"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "open(os.environ['ARGV_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)
    return bindir


def rendered_k8s_argv(w: dict, c: dict, bindir: Path, tmp_path: Path) -> list[str]:
    """psctl's argv in the running container: $(VAR) expanded, then sh run for real."""
    env = container_env(w, c)
    cmd = [expand_k8s(x, env) for x in list(c.get("command") or ["psctl"]) + list(c.get("args") or [])]
    if cmd[0] == "psctl":
        return cmd[1:]
    out = tmp_path / "argv.json"
    subprocess.run(cmd, env={**env, "PATH": f"{bindir}:/usr/bin:/bin", "ARGV_OUT": str(out)},
                   check=True, timeout=30)
    return json.loads(out.read_text())


def mount_path(w: dict, c: dict, volume: str) -> str:
    paths = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == volume]
    assert len(paths) == 1, f"{c['name']} mounts volume {volume} {len(paths)} times"
    return paths[0]


def volume_by(w: dict, pred) -> str:
    names = [v["name"] for v in w["spec"]["template"]["spec"].get("volumes", []) if pred(v)]
    assert len(names) == 1, f"{w['metadata']['name']}: {len(names)} matching volumes"
    return names[0]


@pytest.mark.parametrize("where,doc", K8S, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in K8S])
def test_k8s_manifest_is_valid_against_the_schema(where, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_is_strict():
    """The schema check above would be worthless if typos and wrong types passed it."""
    sts = copy.deepcopy(workload("server"))
    sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "IfNotPresent"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    sts = copy.deepcopy(workload("server"))
    sts["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_k8s_is_namespace_agnostic_and_labelled():
    for where, d in K8S:
        meta = d["metadata"]
        assert "namespace" not in meta, f"{where}: {d['kind']}/{meta['name']} pins a namespace"
        assert meta["name"].startswith("shardps-"), f"{where}: {meta['name']}"
        assert meta.get("labels", {}).get(LABELS[0]) == "shardps", f"{where}: {meta['name']} lacks {LABELS[0]}"
    comps = []
    for w in workloads():
        tmpl = w["spec"]["template"]["metadata"]["labels"]
        comp = tmpl.get(LABELS[1])
        comps.append(comp)
        assert tmpl.get(LABELS[0]) == "shardps" and comp in ROLES, w["metadata"]["name"]
        assert w["metadata"]["labels"][LABELS[1]] == comp
        # the selector must pick out this workload's pods and only on the two stable labels
        assert w["spec"]["selector"]["matchLabels"] == {k: tmpl[k] for k in LABELS}
    assert sorted(comps) == sorted(ROLES)


def test_every_service_selects_exactly_one_workload():
    for svc in of_kind("Service"):
        sel = svc["spec"]["selector"]
        hits = [w["metadata"]["name"] for w in workloads()
                if selects(sel, w["spec"]["template"]["metadata"]["labels"])]
        assert len(hits) == 1, f"Service {svc['metadata']['name']} selects {hits}"


def test_service_ports_target_container_ports():
    for svc in of_kind("Service"):
        w = next(w for w in workloads() if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]))
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert port_of(w, target) is not None, (
                f"Service {svc['metadata']['name']} port {p['name']} targets {target!r}, "
                f"not a port of {w['metadata']['name']}")
            # the same number on both sides: the docs and flags quote one number per role
            assert port_of(w, target) == p["port"], f"{svc['metadata']['name']}: {p}"


def test_probes_ask_the_grpc_health_service_on_declared_ports():
    probed = set()
    for w in workloads():
        comp = w["spec"]["template"]["metadata"]["labels"][LABELS[1]]
        for c in containers(w):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                handler = next(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe)
                if handler == "exec":
                    continue
                port = probe[handler]["port"]
                assert port_of(w, port) is not None, f"{c['name']} {kind} probes undeclared port {port}"
                if handler == "grpc":
                    assert port_of(w, "grpc") == port, f"{c['name']} {kind}: not the gRPC port"
                    assert probe["grpc"].get("service", "") in ("", HEALTH[comp]), f"{c['name']} {kind}"
                    probed.add((comp, kind))
    for comp in HEALTH:  # each gRPC daemon: ready only when its named service is SERVING
        assert {(comp, "readinessProbe"), (comp, "livenessProbe")} <= probed, comp
        readiness = containers(workload(comp))[0]["readinessProbe"]["grpc"]
        assert readiness["service"] == HEALTH[comp]


def test_statefulset_names_a_headless_service_and_claims_a_volume_per_shard():
    for sts in of_kind("StatefulSet"):
        svc = named("Service", sts["spec"]["serviceName"])
        assert svc is not None, f"serviceName {sts['spec']['serviceName']} is not in the manifests"
        assert svc["spec"].get("clusterIP") == "None", "the StatefulSet's Service must be headless"
        assert selects(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
        c = sts["spec"]["template"]["spec"]["containers"][0]
        mounted = {m["name"] for m in c["volumeMounts"]}
        assert set(claims) <= mounted, f"claims {claims} not all mounted"


def test_scheduler_is_a_single_recreated_pod_with_state_on_a_pvc():
    d = workload("scheduler")
    assert d["kind"] == "Deployment" and d["spec"]["replicas"] == 1
    assert d["spec"]["strategy"]["type"] == "Recreate"  # RWO volume: never two pods at once
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in d["spec"]["template"]["spec"]["volumes"]
                 if "persistentVolumeClaim" in v)
    assert named("PersistentVolumeClaim", claim) is not None, f"PVC {claim} is not in the manifests"
    w = workload("worker")
    assert w["kind"] == "Deployment" and isinstance(w["spec"]["replicas"], int)


def test_referenced_configmaps_secrets_and_keys_exist():
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if "secret" in v:
                s = named("Secret", v["secret"]["secretName"])
                assert s is not None, f"Secret {v['secret']['secretName']} is not in the manifests"
                for item in v["secret"].get("items", []):
                    assert item["key"] in s.get("stringData", {}) | s.get("data", {}), item
            if "configMap" in v:
                assert named("ConfigMap", v["configMap"]["name"]) is not None, v
            for src in v.get("projected", {}).get("sources", []):
                if "secret" in src:
                    s = named("Secret", src["secret"]["name"])
                    assert s is not None, f"Secret {src['secret']['name']} is not in the manifests"
                    for item in src["secret"].get("items", []):
                        assert item["key"] in s.get("stringData", {}) | s.get("data", {}), item
        for c in containers(w):
            for src in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in src:
                        assert named(kind, src[key]["name"]) is not None, f"{kind} {src[key]['name']}"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in ref:
                        obj = named(kind, ref[key]["name"])
                        assert obj is not None, f"{kind} {ref[key]['name']}"
                        assert ref[key]["key"] in obj.get("data", {}) | obj.get("stringData", {}), e


def test_every_dollar_reference_in_args_is_defined():
    """An undefined $(VAR) reaches psctl literally: `--mode=$(SHARDPS_MODE)` and a crash loop."""
    for w in workloads():
        for c in containers(w):
            env = container_env(w, c)
            for arg in list(c.get("command", [])) + list(c.get("args", [])):
                for name in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert name in env, f"{c['name']}: $({name}) is not defined"
                for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", arg):  # sh variables
                    assert name in env, f"{c['name']}: ${{{name}}} is not in the environment"


# --------------------------------------------------------------------------- role tokens

SERVICE_OF = {"scheduler": "Scheduler", "server": "ParameterServer"}


def role_secret(role: str) -> str:
    return f"shardps-{role}-token"


def placeholder_token(role: str) -> str:
    return named("Secret", role_secret(role))["stringData"]["token"]


def callers_of(comp: str) -> set[str]:
    """The roles that may call some method of the service `comp` serves (pscommon/roles.py):
    the digests its pods must hold, and no more."""
    service = next(m for m in psroles.METHOD_ROLES if f".{SERVICE_OF[comp]}/" in m).rsplit("/", 1)[0]
    return set().union(*(r for m, r in psroles.METHOD_ROLES.items() if m.startswith(service + "/")))


def pod_spec(d: dict) -> dict:
    return d["spec"]["template"]["spec"] if d["kind"] in WORKLOAD_KINDS else d["spec"]


def token_volume(w: dict) -> str:
    """The one volume that carries role tokens (a projected volume of shardps-*-token Secrets)."""
    names = [v["name"] for v in pod_spec(w).get("volumes", [])
             if any(s.get("secret", {}).get("name", "").endswith("-token")
                    for s in v.get("projected", {}).get("sources", []))]
    assert len(names) == 1, f"{w['metadata']['name']}: {len(names)} token volumes"
    return names[0]


def mounted_token_files(d: dict) -> dict[str, tuple[str, str]]:
    """file name in the token folder -> (Secret, key), for every Secret the pod mounts."""
    files = {}
    for v in pod_spec(d).get("volumes", []):
        assert "secret" not in v or not v["secret"]["secretName"].startswith("shardps-"), (
            f"{d['metadata']['name']}: mount role tokens through the one projected volume")
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                # items always: a whole Secret would bring its token to a pod that needs the digest only
                assert src["secret"].get("items"), f"{d['metadata']['name']}: {src['secret']['name']} without items"
                for item in src["secret"]["items"]:
                    assert item["path"] not in files, f"{d['metadata']['name']}: {item['path']} twice"
                    files[item["path"]] = (src["secret"]["name"], item["key"])
    return files


def project_tokens(d: dict, into: Path) -> Path:
    """The token folder as the kubelet would project it, from the placeholder Secrets."""
    into.mkdir(parents=True, exist_ok=True)
    for path, (secret, key) in mounted_token_files(d).items():
        (into / path).write_text(named("Secret", secret)["stringData"][key])
    return into


def test_each_pod_holds_its_own_roles_token_and_only_the_digests_it_checks():
    for comp in ROLES:
        w = workload(comp)
        files = mounted_token_files(w)
        for path, (secret, key) in files.items():
            role, _, suffix = path.partition(".")
            assert secret == role_secret(role), f"{comp}: {path} comes from {secret}"
            assert {"token": "token", "sha256": "sha256"}[suffix] == key, f"{comp}: {path} is key {key}"
        tokens = {p.split(".")[0] for p in files if p.endswith(".token")}
        digests = {p.split(".")[0] for p in files if p.endswith(".sha256")}
        assert tokens == ({comp} if comp != "scheduler" else set()), f"{comp} holds the tokens of {sorted(tokens)}"
        expected = (callers_of(comp) - tokens) if comp in HEALTH else set()
        assert digests == expected, f"{comp}: digests of {sorted(digests)}, its callers are {sorted(expected)}"


def test_the_ops_pod_holds_the_operators_tokens_and_runs_no_daemon(tmp_path):
    pod = named("Pod", "shardps-ops")
    assert pod is not None, "deploy/k8s/examples/ops-pod.yaml"
    c, = pod["spec"]["containers"]
    assert c["image"] == IMAGE and c["command"] == ["sleep", "infinity"]
    files = mounted_token_files(pod)
    assert set(files) == {"observer.token", "admin.token"}
    assert pod["spec"]["securityContext"]["runAsUser"] == RUN_AS and pod["spec"]["automountServiceAccountToken"] is False
    assert mount_path(pod, c, token_volume(pod)) == "/var/run/secrets/shardps"
    # psctl in it sends the observer token for status and the admin token for checkpoint
    folder = str(project_tokens(pod, tmp_path / "ops"))
    for verb, role in (("status", psroles.OBSERVER), ("inspect", psroles.OBSERVER),
                       ("checkpoint", psroles.ADMIN), ("export", psroles.ADMIN)):
        argv = [verb, "--scheduler", "shardps-scheduler:7000", "--token-dir", folder]
        argv += ["--out", str(tmp_path / "m.safetensors")] if verb == "export" else []
        assert security_from_args(parse(argv, "ops pod")).token == placeholder_token(role), verb


def test_the_placeholder_token_is_not_applied_with_the_manifests():
    """kubectl apply -f deploy/k8s/ must never overwrite a real token with a placeholder."""
    applied = load_k8s(include_examples=False)
    assert not [d for _, d in applied if d["kind"] == "Secret"]
    for role in psroles.ROLES:
        data = named("Secret", role_secret(role))["stringData"]
        assert data["token"].startswith("REPLACE-ME"), role
        # the digest the daemons accept is the placeholder token's, so a throw-away cluster works
        assert bytes.fromhex(data["sha256"]) == token_digest(data["token"]), f"{role}: sha256 is not the token's"


def test_prometheus_annotations_name_the_metrics_port():
    for w in workloads():
        ann = w["spec"]["template"]["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true", w["metadata"]["name"]
        assert port_of(w, "metrics") == int(ann["prometheus.io/port"]), w["metadata"]["name"]
        assert ann.get("prometheus.io/path") == "/metrics"


def test_resources_security_and_grace_periods():
    minimum = {"scheduler": SchedulerConfig.__dataclass_fields__["drain_grace_s"].default + 10,
               "server": ServerConfig.__dataclass_fields__["drain_grace_s"].default + CHECKPOINT_MARGIN_S,
               "worker": 30}
    for w in workloads():
        comp = w["spec"]["template"]["metadata"]["labels"][LABELS[1]]
        spec = w["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] >= minimum[comp], (
            f"{comp}: SIGKILL would cut the drain short")
        assert spec["securityContext"]["runAsUser"] == RUN_AS and spec["securityContext"]["runAsNonRoot"]
        assert spec["securityContext"]["fsGroup"] == RUN_AS  # PVCs and token readable by the user
        for c in containers(w):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']} {kind}"
            assert c["image"] == IMAGE, f"{c['name']} runs {c['image']}, not {IMAGE}"


def test_k8s_command_lines_are_psctl_with_known_subcommands():
    _, subs = psctl_options()
    for w in workloads():
        comp = w["spec"]["template"]["metadata"]["labels"][LABELS[1]]
        for c in containers(w):
            _, argv = k8s_invocation(c)
            sub, _ = split_invocation(argv)
            assert sub in subs and sub == comp, f"{c['name']} runs psctl {sub}"


@pytest.mark.parametrize("comp", ROLES)
def test_k8s_rendered_command_parses_and_wires_up(comp, fake_psctl, tmp_path):
    w = workload(comp)
    c = w["spec"]["template"]["spec"]["containers"][0]
    argv = rendered_k8s_argv(w, c, fake_psctl, tmp_path)
    a = parse(argv, f"{w['kind']}/{w['metadata']['name']}")
    assert a.command == comp
    if comp != "scheduler":
        # the scheduler address must be a Service that forwards to the scheduler's gRPC port
        host, port = host_port(a.scheduler)
        svc = named("Service", host)
        assert svc is not None, f"--scheduler {a.scheduler}: no Service {host}"
        sp = next(p for p in svc["spec"]["ports"] if p["port"] == port)
        assert port_of(workload("scheduler"), sp["targetPort"]) == port_of(workload("scheduler"), "grpc")
    else:
        job = job_from_args(a)  # codecs, optimizer and mode as the scheduler will see them
        assert job.num_servers == workload("server")["spec"]["replicas"], (
            "SHARDPS_NUM_SERVERS and the StatefulSet's replicas disagree")
        claim = volume_by(w, lambda v: "persistentVolumeClaim" in v)
        assert a.state_dir == mount_path(w, c, claim), "--state-dir is not on the PVC"
    if comp in HEALTH:
        assert host_port(a.listen) == ("0.0.0.0", port_of(w, "grpc")), a.listen
    if comp == "server":
        assert a.shard_id == ORDINAL, "the shard id must come from the StatefulSet ordinal"
        domain = container_env(w, c)["SHARDPS_CLUSTER_DOMAIN"]
        svc = w["spec"]["serviceName"]
        assert a.advertise == f"{pod_name(w)}.{svc}.{POD_NAMESPACE}.svc.{domain}:{port_of(w, 'grpc')}"
        claim = w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        assert a.checkpoint_dir == mount_path(w, c, claim), "--checkpoint-dir is not on the shard's PVC"
        assert a.checkpoint_every > 0
    assert a.metrics_port == port_of(w, "metrics")
    # Prometheus scrapes the pod IP; psctl's default for /metrics is loopback
    assert a.metrics_host == "0.0.0.0", f"{comp}: --metrics-host {a.metrics_host}"
    assert a.token_file is None, "role tokens (--token-dir), not one token for every role"
    assert a.token_dir == mount_path(w, c, token_volume(w)), "--token-dir is not where the role tokens are mounted"
    # psctl's own loader, on the folder as the kubelet would project it from the placeholder Secrets
    a.token_dir = str(project_tokens(w, tmp_path / "tokens"))
    sec = security_from_args(a)
    own = {"scheduler": None, "server": psroles.SERVER, "worker": psroles.WORKER}[comp]
    assert sec.token == (placeholder_token(own) if own else None), f"{comp} sends the wrong token"
    if comp in HEALTH:
        for role in psroles.ROLES:
            assert sec.accepted.match(placeholder_token(role).encode()) == (
                {role} if role in callers_of(comp) or role == own else set()), f"{comp} and the {role} token"


# --------------------------------------------------------------------------- compose

def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, over nested structures."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] or op != ":-"):
            return env[name]
        assert op, f"compose: ${{{name}}} has no default"
        return default
    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", sub, value)


def compose_services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return interpolate(load_compose()["services"], env or {})


def compose_argv(svc: dict) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def by_role(services: dict[str, dict], role: str) -> dict[str, dict]:
    return {n: s for n, s in services.items() if compose_argv(s)[0] == role}


def test_compose_uses_the_one_image_built_from_the_dockerfile():
    for name, svc in compose_services().items():
        assert svc["image"] == IMAGE, name
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / "pyproject.toml").is_file(), f"{name}: build context is not the repo root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_command_lines_parse_and_wire_up():
    services = compose_services()
    parsed = {n: parse(compose_argv(s), f"compose service {n}") for n, s in services.items()}
    (sched_name, sched), = by_role(services, "scheduler").items()
    servers = by_role(services, "server")
    workers = by_role(services, "worker")
    assert servers and workers
    job_from_args(parsed[sched_name])
    assert parsed[sched_name].num_servers == len(servers), "--servers and the server services disagree"
    assert sorted(parsed[n].shard_id for n in servers) == list(range(len(servers)))
    sched_port = host_port(parsed[sched_name].listen)[1]
    top = load_compose()
    for name, svc in services.items():
        a = parsed[name]
        if a.command != "scheduler":
            assert a.scheduler == f"{sched_name}:{sched_port}", f"{name}: --scheduler {a.scheduler}"
            assert svc["depends_on"][sched_name]["condition"] == "service_healthy"
        secret = next(iter(svc["secrets"]))
        assert secret in top["secrets"] and a.token_file == f"/run/secrets/{secret}", name
        # published ports reach the container's interface, not its loopback (psctl's default)
        assert a.metrics_port is None or a.metrics_host == "0.0.0.0", f"{name}: --metrics-host {a.metrics_host}"
    checkpoint_volumes = []
    for name in servers:
        a, svc = parsed[name], services[name]
        # workers dial the advertised address: the service name on the compose network
        assert a.advertise == f"{name}:{host_port(a.listen)[1]}", f"{name}: --advertise {a.advertise}"
        vols = [v.split(":") for v in svc["volumes"]]
        mine = [src for src, dst in vols if dst == a.checkpoint_dir]
        assert len(mine) == 1 and mine[0] in top["volumes"], f"{name}: checkpoints not on a named volume"
        checkpoint_volumes += mine
        assert svc["restart"] == "always"
    assert len(set(checkpoint_volumes)) == len(servers), "servers share a checkpoint volume"
    state = [src for src, dst in (v.split(":") for v in sched["volumes"]) if dst == parsed[sched_name].state_dir]
    assert len(state) == 1 and state[0] in top["volumes"]
    for name, svc in workers.items():
        # --scale worker=N needs replicas that can coexist on one host
        assert "container_name" not in svc and "ports" not in svc, name
        for dep, cond in svc["depends_on"].items():
            assert cond["condition"] == "service_healthy" and "healthcheck" in services[dep], dep
        assert svc["restart"] == "on-failure"  # finished workers stay finished


def test_compose_job_spec_follows_the_environment():
    """The SHARDPS_* variables reach the scheduler's flags (a typo in a name would not)."""
    env = {"SHARDPS_MODE": "ssp", "SHARDPS_STALENESS": "3", "SHARDPS_OPTIMIZER": "adam", "SHARDPS_LR": "0.01",
           "SHARDPS_PUSH_CODEC": "topk:0.05", "SHARDPS_PULL_CODEC": "bf16"}
    services = compose_services(env)
    (name, svc), = by_role(services, "scheduler").items()
    job = job_from_args(parse(compose_argv(svc), f"compose {name}"))
    assert (job.mode, job.staleness, job.optimizer.kind, job.optimizer.lr) == ("ssp", 3, "adam", 0.01)
    assert (str(job.push_codec), str(job.pull_codec)) == ("topk:0.05", "bf16")


def compose_health(svc: dict) -> tuple[list[str], str, str]:
    """(python -c argv, address, service name) of a compose healthcheck."""
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["python", "-c"], test
    return test[1:], test[4], test[5]


def test_compose_healthchecks_ask_the_right_port_and_service():
    services = compose_services()
    for name, svc in services.items():
        a = parse(compose_argv(svc), name)
        if a.command not in HEALTH:
            assert "healthcheck" not in svc
            continue
        _, address, service = compose_health(svc)
        assert address == f"127.0.0.1:{host_port(a.listen)[1]}" and service == HEALTH[a.command], name
        minimum = (ServerConfig if a.command == "server" else SchedulerConfig).__dataclass_fields__[
            "drain_grace_s"].default + (CHECKPOINT_MARGIN_S if a.command == "server" else 10)
        assert duration_s(svc["stop_grace_period"]) >= minimum, f"{name}: stop_grace_period"


def duration_s(text: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", text))


def override(argv: list[str], **values) -> list[str]:
    """Replace (or with None drop) `--flag value` / `--flag=value` in argv; keys use _ for -."""
    out, skip = [], False
    want = {"--" + k.replace("_", "-"): v for k, v in values.items()}
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in want:
            skip = "=" not in arg
            if want[flag] is not None:
                out.append(f"{flag}={want[flag]}")
            continue
        out.append(arg)
    return out


def start(argv: list[str], ready: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(tmp_path / f"{ready.name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "shardps.psctl", *argv, f"--ready-file={ready}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    end = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"psctl {shlex.join(argv)} did not come up:\n{(tmp_path / f'{ready.name}.log').read_text()}")
        time.sleep(0.05)
    return proc, ready.read_text().strip()


def health_check(address: str, service: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_compose_healthcheck_follows_the_serving_status():
    """A drain turns health NOT_SERVING before the port closes: the one-liner must fail then
    too, not only when nothing answers. Served here by the daemons' own health helpers."""
    from shardps.pscommon import grpcutil
    services = compose_services()
    server = grpcutil.make_server(max_workers=2)
    health = grpcutil.add_health(server)
    address = grpcutil.bind(server, "127.0.0.1:0")
    server.start()
    try:
        for name, svc in services.items():
            if "healthcheck" not in svc:
                continue
            cmd, _, service = compose_health(svc)

            def check() -> int:
                return subprocess.run([sys.executable, *cmd[1:3], address, service],
                                      capture_output=True, timeout=30).returncode
            grpcutil.set_serving(health, service, True)
            assert check() == 0, f"{name}: SERVING must pass"
            grpcutil.set_serving(health, service, False)
            assert check() != 0, f"{name}: NOT_SERVING must fail"
    finally:
        server.stop(0).wait()


@pytest.mark.slow
def test_health_checks_pass_against_real_daemons_and_fail_once_they_stop(tmp_path):
    """The compose command lines, run for real on loopback: the compose healthcheck one-liners
    and the Kubernetes probes' service names must see SERVING, the one-liner must fail once the
    daemon is gone (it is not `exit 0`), and SIGTERM must end each daemon with status 0."""
    from grpc_health.v1 import health_pb2
    services = compose_services()
    (sched_name, sched), = by_role(services, "scheduler").items()
    server_name, server = sorted(by_role(services, "server").items())[0]
    token = tmp_path / "token"
    token.write_text("t0k3n-for-the-test\n")
    # metrics on any free port (0): a port picked here and bound later may be taken meanwhile
    # by a test running beside this one
    s_argv = override(compose_argv(sched), listen="127.0.0.1:0", state_dir=tmp_path / "state",
                      servers=1, metrics_port=0, token_file=token)
    s_proc, s_addr = start(s_argv, tmp_path / "sched.ready", tmp_path)
    procs = [s_proc]
    try:
        p_argv = override(compose_argv(server), scheduler=s_addr, listen="127.0.0.1:0", advertise=None,
                          shard_id=0, checkpoint_dir=tmp_path / "ckpt", metrics_port=0,
                          token_file=token)
        p_proc, p_addr = start(p_argv, tmp_path / "server.ready", tmp_path)
        procs.append(p_proc)
        for (name, svc), addr in (((sched_name, sched), s_addr), ((server_name, server), p_addr)):
            cmd, _, service = compose_health(svc)
            run = subprocess.run([sys.executable, *cmd[1:3], addr, service], capture_output=True, timeout=30)
            assert run.returncode == 0, f"{name} healthcheck: {run.stderr.decode()}"
        for w, addr in ((workload("scheduler"), s_addr), (workload("server"), p_addr)):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = w["spec"]["template"]["spec"]["containers"][0][kind]["grpc"].get("service", "")
                assert health_check(addr, service) == health_pb2.HealthCheckResponse.SERVING, kind
        for proc, addr, svc in ((p_proc, p_addr, server), (s_proc, s_addr, sched)):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, "a daemon must drain and exit 0 on SIGTERM"
            cmd, _, service = compose_health(svc)
            run = subprocess.run([sys.executable, *cmd[1:3], addr, service], capture_output=True, timeout=30)
            assert run.returncode != 0, "the healthcheck passed with the daemon gone"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- systemd

def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's ini dialect: repeated keys accumulate, backslash continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def read_env_file(path: Path, uncomment: str | None = None) -> dict[str, str]:
    """An EnvironmentFile; `uncomment` also reads commented-out assignments of that name."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if uncomment and line.startswith(f"#{uncomment}="):
            line = line[1:]
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip().strip('"')
    return env


def systemd_argv(exec_start: str, env: dict[str, str], instance: str) -> list[str]:
    """ExecStart as systemd runs it: %i, then ${VAR} as one word and $VAR split on spaces."""
    line = exec_start.replace("%i", instance).replace("%H", "host-a").replace("%%", "%")
    out = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            assert m.group(1) in env, f"${m.group(1)} is not in the environment file"
            out += env[m.group(1)].split()
            continue
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", word):
            # unset, it expands to nothing and the flag would swallow the next one
            assert env.get(name), f"${{{name}}} is not set in {ENV_EXAMPLE.name}"
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return out


UNITS = {"scheduler": "shardps-scheduler.service", "server": "shardps-server@.service",
         "worker": "shardps-worker@.service"}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_systemd_units_run_psctl_with_known_flags(role, tls):
    unit = read_unit(SYSTEMD / UNITS[role])
    svc = unit["Service"]
    env = {k: v.replace("%i", "2") for k, v in (e.partition("=")[::2] for e in svc.get("Environment", []))}
    files = [f.lstrip("-") for f in svc["EnvironmentFile"]]
    assert "/etc/shardps/shardps.env" in files and not svc["EnvironmentFile"][0].startswith("-"), (
        "the common environment file must be required, not optional")
    env.update(read_env_file(ENV_EXAMPLE, uncomment="SHARDPS_TLS_ARGS" if tls else None))
    exec_start, = svc["ExecStart"]
    assert Path(shlex.split(exec_start)[0]).name == "psctl"
    argv = systemd_argv(exec_start.split(None, 1)[1], env, instance="2")
    a = parse(argv, f"{UNITS[role]} with {ENV_EXAMPLE.name}")
    assert a.command == role and a.token_file == env["SHARDPS_TOKEN_FILE"]
    if tls:
        assert a.tls_cert and a.tls_key and a.tls_ca
    state = [f"/var/lib/{d.replace('%i', '2')}" for d in svc["StateDirectory"]]
    if role == "scheduler":
        job_from_args(a)
        assert a.state_dir in state
    if role == "server":
        assert a.shard_id == 2, "the instance name is the shard id"
        assert a.checkpoint_dir in state, "checkpoints must go to the unit's StateDirectory"
    if role == "worker":
        assert str(Path(a.metrics_out).parent) in state
    assert svc["User"] == ["shardps"] and svc["KillSignal"] == ["SIGTERM"]
    assert svc["Restart"] == ["always" if role == "server" else "on-failure"]
    minimum = {"scheduler": SchedulerConfig.__dataclass_fields__["drain_grace_s"].default + 10,
               "server": ServerConfig.__dataclass_fields__["drain_grace_s"].default + CHECKPOINT_MARGIN_S,
               "worker": 30}[role]
    assert float(svc["TimeoutStopSec"][0]) >= minimum
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_roles_on_one_host_do_not_collide_on_ports():
    env = read_env_file(ENV_EXAMPLE)
    ports = [env[k] for k in ("SHARDPS_SCHEDULER_METRICS_PORT", "SHARDPS_SERVER_METRICS_PORT",
                              "SHARDPS_WORKER_METRICS_PORT")]
    ports += [env[k].rpartition(":")[2] for k in ("SHARDPS_SCHEDULER_LISTEN", "SHARDPS_SERVER_LISTEN")]
    assert len(set(ports)) == len(ports), ports


# --------------------------------------------------------------------------- every flag

def invocations() -> list[tuple[str, list[str]]]:
    """(where, psctl argv) from every deployment file and every psctl line in the docs."""
    found = []
    for w in workloads():
        for c in containers(w):
            found.append((f"deploy/k8s {w['kind']}/{w['metadata']['name']}", k8s_invocation(c)[1]))
    for name, svc in compose_services().items():
        found.append((f"deploy/compose.yaml {name}", compose_argv(svc)))
    tls = read_env_file(ENV_EXAMPLE, uncomment="SHARDPS_TLS_ARGS")["SHARDPS_TLS_ARGS"].split()
    for unit in UNITS.values():
        exec_start, = read_unit(SYSTEMD / unit)["Service"]["ExecStart"]
        found.append((f"deploy/systemd/{unit}", shlex.split(exec_start)[1:] + tls))
    found += [(f"docs/deploy.md:{n}", argv) for n, argv in doc_invocations()]
    return found


def doc_invocations() -> list[tuple[int, list[str]]]:
    """psctl command lines in the fenced code blocks of docs/deploy.md (line number, argv)."""
    out, in_block = [], False
    lines = DOCS.read_text().splitlines()
    joined: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
        else:
            joined.append((n, line.strip()))
    for n, line in joined:
        if line.startswith("#"):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        try:
            words = list(lex)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if Path(word).name == "psctl":
                argv = []
                for w in words[i + 1:]:
                    if set(w) <= set(";&|<>"):
                        break
                    argv.append(w)
                if argv and not {"-h", "--help"} & set(argv):
                    out.append((n, argv))
    return out


def test_every_flag_used_exists_in_psctl():
    top, subs = psctl_options()
    missing: dict[str, set[str]] = {}
    for where, argv in invocations():
        sub, args = split_invocation(argv)
        assert sub in subs, f"{where}: psctl has no subcommand {sub!r}"
        for flag in flags_of(argv[: argv.index(sub)]):
            if flag not in top:
                missing.setdefault(f"psctl {flag}", set()).add(where)
        for flag in flags_of(args):
            if flag not in subs[sub]:
                missing.setdefault(f"psctl {sub} {flag}", set()).add(where)
    assert not missing, "flags psctl does not have:\n" + "\n".join(
        f"  {flag}  (used in {', '.join(sorted(where))})" for flag, where in sorted(missing.items()))


# --------------------------------------------------------------------------- Dockerfile

def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile()
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def test_dockerfile_runs_psctl_as_non_root_and_exposes_the_manifest_ports():
    ins = dockerfile()
    args = {}
    for k, rest in ins:
        if k == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
        if k == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            assert image == "python:3.11-slim", image
    final = dict((k, v) for k, v in final_stage())  # last instruction of each kind wins
    assert json.loads(final["ENTRYPOINT"]) == ["psctl"], "exec form, so psctl is PID 1 and gets SIGTERM"
    assert final["STOPSIGNAL"] == "SIGTERM"
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) == RUN_AS, "k8s runAsUser and the image must agree"
    exposed = {int(p.split("/")[0]) for k, v in final_stage() if k == "EXPOSE" for p in v.split()}
    used = {p["containerPort"] for w in workloads() for p in container_ports(w)}
    for name, svc in compose_services().items():
        a = parse(compose_argv(svc), name)
        used.add(a.metrics_port)
        if a.command in HEALTH:
            used.add(host_port(a.listen)[1])
    assert used <= exposed, f"ports used but not exposed: {sorted(used - exposed)}"
    assert {7000, 7100, 9100} <= exposed


def test_dockerfile_installs_the_project_with_the_constraints():
    runs = [v for k, v in dockerfile() if k == "RUN"]
    assert any(re.search(r"pip install -c constraints\.txt \.(\s|$)", r) for r in runs)
    # torch comes from the index named by the build arg (CPU by default), pinned the same way
    torch = [r for r in runs if re.search(r"\btorch\b", r) and "pip install" in r]
    assert torch and all('--index-url "${TORCH_INDEX_URL}"' in r and "-c constraints.txt" in r for r in torch)
    assert any(k == "ARG" and v.startswith("TORCH_INDEX_URL=") and v.endswith("/cpu") for k, v in dockerfile())


def copy_sources() -> list[str]:
    srcs = []
    for k, v in dockerfile():
        if k == "COPY" and "--from" not in v:
            srcs += v.split()[:-1]
    return srcs


def test_dockerfile_copies_every_package_and_the_build_inputs():
    srcs = {s.rstrip("/") for s in copy_sources()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["package-dir"].values())  # the folders
    readme = project["project"]["readme"]
    assert packages | {"pyproject.toml", "constraints.txt", readme} <= srcs, (
        f"not copied into the image: {sorted(packages | {'pyproject.toml', readme} - srcs)}")
    for s in srcs:
        assert (ROOT / s).exists(), f"COPY {s}: no such path in the repository"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: a pattern matches the path or a parent; last match wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        variants = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_secrets_out_and_build_inputs_in():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for src in copy_sources():
        assert not dockerignored(src.rstrip("/"), patterns), f"{src} is COPYed but .dockerignore drops it"
        assert not dockerignored(f"{src.rstrip('/')}/__init__.py", patterns) or not (ROOT / src).is_dir()
    for secret in ("deploy/secrets/token", ".git/config", ".venv/bin/python", "psctl/__pycache__/cli.pyc"):
        assert dockerignored(secret, patterns), f"{secret} would be sent to the Docker daemon"


# --------------------------------------------------------------------------- one image, one story

def test_image_name_and_tag_agree_everywhere():
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert IMAGE == f"shardps:{version}", "the image tag follows the package version"
    images = {c["image"] for w in workloads() for c in containers(w)}
    images |= {s["image"] for s in compose_services().values()}
    assert images == {IMAGE}
    docs = DOCS.read_text()
    assert IMAGE in docs and f"-t {IMAGE}" in docs, "docs/deploy.md must build the image the manifests run"


def test_docs_name_the_health_service_and_existing_files():
    docs = DOCS.read_text()
    for name in ("grpc.health.v1.Health", *HEALTH.values()):
        assert name in docs, name
    # deploy/shardps-* is kubectl's short name for a Deployment, not a path
    for ref in set(re.findall(r"(?<![\w/])deploy/(?!shardps-)[\w.@/-]*[\w@]", docs)):
        if "secrets" in ref:  # made by the reader, never committed
            continue
        assert (ROOT / ref).exists(), f"docs/deploy.md mentions {ref}, which does not exist"
    assert doc_invocations(), "no psctl command lines found in docs/deploy.md"


def test_k8s_manifests_all_listed_in_the_docs():
    docs = DOCS.read_text()
    for f in sorted(K8S_DIR.glob("*.yaml")) + sorted((K8S_DIR / "examples").glob("*.yaml")):
        assert str(f.relative_to(ROOT)) in docs or f.name in docs, f"docs/deploy.md never mentions {f.name}"


def test_renderers_follow_the_tools_rules():
    """The renderers above decide what counts as a psctl argument; check them on known input."""
    assert expand_k8s("--a=$(X) $$(X) $(Y)", {"X": "1"}) == "--a=1 $(X) $(Y)"
    assert interpolate("${A:-d} ${B-e} ${C:-f} $$x", {"A": "", "B": "", "C": "c"}) == "d  c $x"
    assert systemd_argv("x --p ${P} $T --i %i", {"P": "a b", "T": "--u 1"}, "4") == [
        "x", "--p", "a b", "--u", "1", "--i", "4"]
    assert override(["--a", "1", "--b=2", "--c=3"], a=9, b=None) == ["--a=9", "--c=3"]
    assert dockerignored("deploy/secrets/token", ["deploy"]) and not dockerignored("psctl/cli.py", ["deploy"])
    assert dockerignored("a/__pycache__/x.pyc", ["**/__pycache__"])
    assert not dockerignored("deploy/x", ["deploy", "!deploy/x"])
