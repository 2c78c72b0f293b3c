"""The deployment files (deploy/, grafana/provisioning/) are consistent with each other and with the proxy.

Structural checks always run, on the files as written: every Kubernetes object is named, probes hit the
proxy's real health endpoints on the container's port, the policy ConfigMap lands where `--config`
reads it, Service/HPA/PDB point at the Deployment, kustomizations list only files that exist, the Helm
chart is complete, Compose mounts only paths the repository has, the Dockerfile runs as non-root with a
health check. Where the real tools are on PATH (kubectl, helm, `docker compose`) the files are also
rendered by them and the rendered objects checked the same way.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_policy_file

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CHART = DEPLOY / "helm" / "llm-numbers-proxy"
COMPOSE = DEPLOY / "docker-compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"

PORT = 4000
SECRET_NAME = "llm-numbers-proxy-secrets"
SECRET_KEYS = {"LLM_PROXY_MASTER_KEY", "OPENAI_API_KEY", "LLM_PROXY_REDIS_URL"}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
# Paths a Compose bind mount may name before they exist in a fresh clone: Docker creates an empty
# folder there. grafana/dashboards/ holds dashboard JSON files that are committed separately.
MAY_BE_CREATED_BY_DOCKER = {ROOT / "grafana" / "dashboards"}


# ----------------------------------------------------------------------------------------- helpers


def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _load_all_text(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _kustomization_files() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _generator_inputs() -> dict[Path, tuple[str, str]]:
    """configMapGenerator/secretGenerator input files → (generator name, key in the object)."""
    out: dict[Path, tuple[str, str]] = {}
    for kfile in _kustomization_files():
        k = _load_all(kfile)[0]
        for gen in (k.get("configMapGenerator") or []) + (k.get("secretGenerator") or []):
            for entry in gen.get("files") or []:
                key, _, rel = entry.rpartition("=")
                out[(kfile.parent / rel).resolve()] = (gen["name"], key or posixpath.basename(rel))
    return out


def _k8s_manifest_files() -> list[Path]:
    inputs = _generator_inputs()
    return sorted(
        p
        for p in list(K8S.rglob("*.yaml")) + list(K8S.rglob("*.yml"))
        if p.name != "kustomization.yaml" and p.resolve() not in inputs
    )


def _k8s_objects() -> list[dict]:
    return [doc for p in _k8s_manifest_files() for doc in _load_all(p)]


def _one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def _proxy_deployment(objs: list[dict]) -> dict:
    """The Deployment whose container runs `serve` (the bundled Redis is another Deployment)."""
    found = [
        o
        for o in objs
        if o.get("kind") == "Deployment"
        and any("serve" in (c.get("args") or []) for c in o["spec"]["template"]["spec"]["containers"])
    ]
    assert len(found) == 1, "expected exactly one Deployment whose container runs `serve`"
    return found[0]


def _container(dep: dict) -> dict:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the proxy pod has one container"
    return containers[0]


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from the container args {args}"
    return str(args[args.index(flag) + 1])


def _resolve_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"port name {port!r} is not a port of container {container['name']}")


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _check_objects_are_named(objs: list[dict], where: str) -> None:
    assert objs, f"{where}: no objects"
    for o in objs:
        assert isinstance(o, dict), f"{where}: a document that is not a mapping: {o!r}"
        assert o.get("apiVersion"), f"{where}: object without apiVersion: {o}"
        assert o.get("kind"), f"{where}: object without kind: {o}"
        assert (o.get("metadata") or {}).get("name"), f"{where}: {o['kind']} without metadata.name"


def _check_proxy_objects(objs: list[dict], configmap_keys: dict[str, set[str]], where: str) -> None:
    """The shape every rendering of the proxy must have: kustomize base (as written or rendered) and Helm."""
    _check_objects_are_named(objs, where)
    dep = _proxy_deployment(objs)
    dep_name = dep["metadata"]["name"]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    c = _container(dep)
    args = [str(a) for a in c["args"]]

    # selector ↔ pod labels
    assert _matches(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: selector does not match pods"

    # listens where everything else expects it
    assert args[0] == "serve"
    assert _arg(args, "--host") == "0.0.0.0", f"{where}: must listen on all interfaces in a pod"
    assert int(_arg(args, "--port")) == PORT
    assert PORT in [p["containerPort"] for p in c["ports"]], f"{where}: container port {PORT} not declared"

    # probes: /readyz for readiness (Redis reachable), /healthz for liveness, both on the serving port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = (c.get(probe) or {}).get("httpGet")
        assert get, f"{where}: {probe} must be an httpGet"
        assert get["path"] == path, f"{where}: {probe} path {get['path']} != {path}"
        assert _resolve_port(c, get["port"]) == PORT, f"{where}: {probe} is not on port {PORT}"

    # non-root, read-only root filesystem, no privilege escalation
    pod_sc = pod["spec"].get("securityContext") or {}
    c_sc = c.get("securityContext") or {}
    assert (c_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, f"{where}: runAsNonRoot must be true"
    assert c_sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}: runAsUser 0"
    assert c_sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem must be read-only"
    assert c_sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"

    # resources: the HPA's CPU utilisation is relative to the CPU request
    res = c.get("resources") or {}
    assert res.get("requests", {}).get("cpu"), f"{where}: a CPU request is required for the HPA"
    assert res.get("limits", {}).get("memory"), f"{where}: a memory limit is required"

    # Prometheus finds the pods by annotation
    ann = pod["metadata"].get("annotations") or {}
    assert ann.get("prometheus.io/scrape") == "true", f"{where}: prometheus.io/scrape annotation"
    assert ann.get("prometheus.io/port") == str(PORT), f"{where}: prometheus.io/port annotation"
    assert ann.get("prometheus.io/path", "/metrics") == "/metrics"

    # the policy ConfigMap is mounted, as a directory, exactly where --config reads it
    config = _arg(args, "--config")
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    policy_mounts = [
        m for m in c.get("volumeMounts") or [] if (volumes.get(m["name"]) or {}).get("configMap", {}).get("name")
    ]
    assert policy_mounts, f"{where}: no ConfigMap is mounted"
    hits = []
    for m in policy_mounts:
        cm_name = volumes[m["name"]]["configMap"]["name"]
        assert cm_name in configmap_keys, f"{where}: mounted ConfigMap {cm_name} is not defined"
        assert not m.get("subPath"), f"{where}: a subPath mount never sees ConfigMap updates (no hot reload)"
        for key in configmap_keys[cm_name]:
            if posixpath.join(m["mountPath"], key) == config:
                hits.append(cm_name)
    assert hits, f"{where}: --config {config} is not a key of a mounted ConfigMap"

    # the Secret's keys arrive as environment variables
    env = {e["name"]: e for e in c.get("env") or []}
    for key in SECRET_KEYS - {"LLM_PROXY_REDIS_URL"}:
        ref = (env.get(key) or {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref, f"{where}: {key} must come from a Secret"
        assert ref["key"] == key

    # Service → the container port, selecting these pods and only them
    services = [o for o in objs if o["kind"] == "Service" and _matches(o["spec"].get("selector") or {}, pod_labels)]
    assert len(services) == 1, f"{where}: expected one Service selecting the proxy pods"
    svc = services[0]
    for sp in svc["spec"]["ports"]:
        assert _resolve_port(c, sp.get("targetPort", sp["port"])) == PORT, f"{where}: Service targets another port"
    assert PORT in [sp["port"] for sp in svc["spec"]["ports"]]
    _check_services_select_one_deployment(objs, where)

    # HPA → this Deployment, CPU 70 %
    hpa = _one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep_name), f"{where}: HPA targets {ref}"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["averageUtilization"] == 70

    # PDB → these pods, and it never blocks every eviction
    pdb = _one(objs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: PDB selects other pods"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], f"{where}: the PDB would block every drain"


def _check_services_select_one_deployment(objs: list[dict], where: str) -> None:
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    for svc in (o for o in objs if o["kind"] == "Service"):
        sel = svc["spec"].get("selector") or {}
        chosen = [d for d in deployments if _matches(sel, d["spec"]["template"]["metadata"]["labels"])]
        assert len(chosen) == 1, f"{where}: Service {svc['metadata']['name']} selects {len(chosen)} Deployments"
        c = chosen[0]["spec"]["template"]["spec"]["containers"][0]
        for sp in svc["spec"]["ports"]:
            _resolve_port(c, sp.get("targetPort", sp["port"]))  # a name the container has


def _configmaps(objs: list[dict]) -> dict[str, set[str]]:
    return {o["metadata"]["name"]: set(o.get("data") or {}) for o in objs if o["kind"] == "ConfigMap"}


def _run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    return proc


# ------------------------------------------------------------------------------- Kubernetes (kustomize)


def test_every_k8s_yaml_parses_and_every_object_is_named():
    files = _k8s_manifest_files()
    assert K8S / "deployment.yaml" in files
    for path in files:
        _check_objects_are_named(_load_all(path), str(path.relative_to(ROOT)))
    for kfile in _kustomization_files():
        docs = _load_all(kfile)
        assert len(docs) == 1, f"{kfile}: one document"
        assert docs[0].get("apiVersion", "").startswith("kustomize.config.k8s.io/")
        assert docs[0].get("kind") in KUSTOMIZE_KINDS
    for path in _generator_inputs():
        assert path.is_file(), f"generator input {path} is missing"
        _load_all(path)  # YAML inputs parse


def test_kustomizations_list_only_files_that_exist_and_leave_none_out():
    listed: set[Path] = set()
    for kfile in _kustomization_files():
        k = _load_all(kfile)[0]
        base = kfile.parent
        entries = list(k.get("resources") or []) + list(k.get("components") or [])
        entries += [p["path"] for p in k.get("patches") or [] if "path" in p]
        for gen in (k.get("configMapGenerator") or []) + (k.get("secretGenerator") or []):
            entries += [e.rpartition("=")[2] for e in gen.get("files") or []]
        for entry in entries:
            target = (base / entry).resolve()
            assert target.exists(), f"{kfile.relative_to(ROOT)} lists {entry}, which does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{entry} is a folder without a kustomization"
            listed.add(target)
    secret_example = (K8S / "secret.example.yaml").resolve()
    assert secret_example.is_file()
    assert secret_example not in listed, "secret.example.yaml must not be applied by kustomize"
    forgotten = [p for p in _k8s_manifest_files() if p.resolve() not in listed and p.resolve() != secret_example]
    assert not forgotten, f"manifests no kustomization lists: {forgotten}"


def test_k8s_base_deployment_service_hpa_pdb_as_written():
    base = [
        doc
        for p in _k8s_manifest_files()
        if p.parent == K8S and p.name != "secret.example.yaml"
        for doc in _load_all(p)
    ]
    configmaps = {}
    k = _load_all(K8S / "kustomization.yaml")[0]
    for gen in k.get("configMapGenerator") or []:
        configmaps[gen["name"]] = {(e.rpartition("=")[0] or posixpath.basename(e)) for e in gen.get("files") or []}
    _check_proxy_objects(base, configmaps, "deploy/k8s")
    dep = _proxy_deployment(base)
    assert dep["spec"]["replicas"] == 2
    # the Secret the pods read: its name, and LLM_PROXY_REDIS_URL required (replicas must share one Redis)
    env = {e["name"]: e for e in _container(dep)["env"]}
    for key in SECRET_KEYS:
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET_NAME
    assert env["LLM_PROXY_REDIS_URL"]["valueFrom"]["secretKeyRef"].get("optional") is not True


def test_k8s_secret_example_and_bundled_redis_agree():
    secret = _one(_load_all(K8S / "secret.example.yaml"), "Secret")
    assert secret["metadata"]["name"] == SECRET_NAME
    assert set(secret["stringData"]) == SECRET_KEYS
    redis_objs = [
        doc for p in sorted((K8S / "redis").glob("*.yaml")) if p.name != "kustomization.yaml" for doc in _load_all(p)
    ]
    _check_objects_are_named(redis_objs, "deploy/k8s/redis")
    _check_services_select_one_deployment(redis_objs, "deploy/k8s/redis")
    svc = _one(redis_objs, "Service")
    url = secret["stringData"]["LLM_PROXY_REDIS_URL"]
    assert url.startswith("redis://")
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    assert host_port == f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}", "the URL names another Redis"
    dep = _one(redis_objs, "Deployment")
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0


def test_k8s_policy_copy_is_valid_and_equals_the_default_policy():
    copy = K8S / "policy.yaml"
    load_policy_file(str(copy))  # raises ConfigError listing every problem
    assert yaml.safe_load(copy.read_text()) == yaml.safe_load(DEFAULT_POLICY.read_text()), (
        "deploy/k8s/policy.yaml drifted from policies/default.yaml: run deploy/sync-policy.sh"
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH (structural checks ran)")
def test_kubectl_kustomize_renders_the_base_and_the_bundled_redis(tmp_path):
    objs = _load_all_text(_run(["kubectl", "kustomize", "deploy/k8s"]).stdout)
    configmaps = _configmaps(objs)
    _check_proxy_objects(objs, configmaps, "kubectl kustomize deploy/k8s")
    (cm_name,) = configmaps
    assert re.fullmatch(r"llm-numbers-proxy-policy-[a-z0-9]{10}", cm_name), "configMapGenerator hash suffix"
    cm = _one(objs, "ConfigMap")
    assert yaml.safe_load(cm["data"]["policy.yaml"]) == yaml.safe_load(DEFAULT_POLICY.read_text())
    assert _container(_proxy_deployment(objs))["image"].startswith("llm-numbers-proxy:")

    redis_objs = _load_all_text(_run(["kubectl", "kustomize", "deploy/k8s/redis"]).stdout)
    _check_services_select_one_deployment(redis_objs, "kubectl kustomize deploy/k8s/redis")

    # the base and the bundled Redis together (what un-commenting `- redis` in the base gives)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [os.path.relpath(K8S, tmp_path), os.path.relpath(K8S / "redis", tmp_path)]}),
        encoding="utf-8",
    )
    both = _load_all_text(_run(["kubectl", "kustomize", str(tmp_path)]).stdout)
    _check_proxy_objects(both, _configmaps(both), "deploy/k8s + deploy/k8s/redis")
    assert len([o for o in both if o["kind"] == "Deployment"]) == 2


# ---------------------------------------------------------------------------------------------- Helm

TEMPLATES = [
    "_helpers.tpl",
    "NOTES.txt",
    "deployment.yaml",
    "service.yaml",
    "configmap.yaml",
    "hpa.yaml",
    "pdb.yaml",
    "redis.yaml",
]


def test_helm_chart_files_parse_and_templates_are_balanced():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "llm-numbers-proxy" == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", str(chart["version"]))
    assert chart.get("appVersion")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("image", "replicaCount", "existingSecret", "redis", "autoscaling", "podDisruptionBudget", "policy"):
        assert key in values, f"values.yaml lacks {key}"
    assert values["existingSecret"] == SECRET_NAME
    assert {"enabled", "externalUrl"} <= set(values["redis"])
    assert values["autoscaling"]["targetCPUUtilizationPercentage"] == 70
    assert yaml.safe_load(values["policy"]) == yaml.safe_load(DEFAULT_POLICY.read_text()), (
        "values.yaml's policy drifted from policies/default.yaml: run deploy/sync-policy.sh"
    )
    for name in TEMPLATES:
        path = CHART / "templates" / name
        assert path.is_file(), f"templates/{name} is missing"
        text = path.read_text()
        assert text.count("{{") == text.count("}}"), f"templates/{name}: unbalanced {{{{ }}}}"
        actions = re.findall(r"{{-?\s*(if|with|range|define|end)\b", text)
        opened = sum(1 for a in actions if a != "end")
        assert opened == actions.count("end"), f"templates/{name}: {opened} blocks opened, {actions.count('end')} ended"
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "checksum/config" in deployment and "sha256sum" in deployment, "pods must roll when the policy changes"
    assert "/readyz" in deployment and "/healthz" in deployment


def _helm_template(*args: str) -> list[dict]:
    return _load_all_text(_run(["helm", "template", "rel", str(CHART), *args]).stdout)


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not on PATH (static chart checks ran)")
def test_helm_template_renders_the_same_shape(tmp_path):
    _run(["helm", "lint", "--strict", str(CHART)])
    objs = _helm_template()
    _check_proxy_objects(objs, _configmaps(objs), "helm template")
    dep = _proxy_deployment(objs)
    cm = _one(objs, "ConfigMap")
    assert yaml.safe_load(cm["data"]["policy.yaml"]) == yaml.safe_load(DEFAULT_POLICY.read_text())
    checksum = dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", checksum)
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"

    # bundled Redis: the proxy's URL names the chart's Redis Service
    env = {e["name"]: e for e in _container(dep)["env"]}
    redis_svc = _one(
        [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-redis")], "Service"
    )
    assert env["LLM_PROXY_REDIS_URL"]["value"] == f"redis://{redis_svc['metadata']['name']}:6379/0"
    assert env["LLM_PROXY_MASTER_KEY"]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME

    # an external Redis instead: no bundled one
    ext = _helm_template("--set", "redis.enabled=false", "--set", "redis.externalUrl=redis+cluster://r:6379")
    assert len([o for o in ext if o["kind"] == "Deployment"]) == 1
    env = {e["name"]: e for e in _container(_proxy_deployment(ext))["env"]}
    assert env["LLM_PROXY_REDIS_URL"]["value"] == "redis+cluster://r:6379"

    # several replicas without a shared Redis is refused, a single embedded one is allowed
    proc = subprocess.run(
        ["helm", "template", "rel", str(CHART), "--set", "redis.enabled=false"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "shared Redis" in proc.stderr
    single = _helm_template(
        "--set", "redis.enabled=false", "--set", "autoscaling.enabled=false", "--set", "replicaCount=1"
    )
    assert _proxy_deployment(single)["spec"]["replicas"] == 1
    assert "LLM_PROXY_REDIS_URL" not in {e["name"] for e in _container(_proxy_deployment(single))["env"]}

    # another policy → another checksum (pods roll)
    other = tmp_path / "values.yaml"
    other.write_text(yaml.safe_dump({"policy": "version: 1\nmodels: {}\nteams: {}\n"}))
    changed = _proxy_deployment(_helm_template("-f", str(other)))
    assert changed["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != checksum


# ------------------------------------------------------------------------------------------- Compose


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_stack_and_a_demo_profile():
    services = _compose()["services"]
    for name in ("proxy", "redis", "prometheus", "grafana"):
        assert name in services, f"service {name} missing"
        assert not services[name].get("profiles"), f"{name} must run without a profile"
        assert services[name].get("healthcheck"), f"{name} needs a healthcheck"
    mock = services["mock-upstream"]
    assert mock["profiles"] == ["demo"]
    assert mock["command"][:1] == ["mock-upstream"] and "8090" in [str(a) for a in mock["command"]]

    proxy = services["proxy"]
    build = proxy["build"]
    assert build["context"] == ".."
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    env = proxy["environment"]
    assert env["LLM_PROXY_REDIS_URL"] == "redis://redis:6379/0"
    assert env["LLM_PROXY_DEMO_API_BASE"] == "http://mock-upstream:8090/v1"
    assert "LLM_PROXY_MASTER_KEY" in env and "OPENAI_API_KEY" in env
    assert str(PORT) in " ".join(str(p) for p in proxy["ports"])
    assert "mock-upstream" not in (proxy.get("depends_on") or {}), "the proxy must start without --profile demo"

    # every depends_on names a service; service_healthy only on services with a healthcheck
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}'s health, which has no check"
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_mounts_only_paths_the_repository_has():
    services = _compose()["services"]
    seen = set()
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if not source.startswith((".", "/")):
                continue  # a named volume
            path = (DEPLOY / source).resolve()
            seen.add(path)
            assert path.exists() or path in MAY_BE_CREATED_BY_DOCKER, f"{name} mounts {source}: not in the repo"
    assert (ROOT / "deploy" / "prometheus.yml").resolve() in seen
    assert (ROOT / "grafana" / "provisioning").resolve() in seen
    # the proxy's --config names a file that the policies mount provides (default value of the variable)
    cmd = [str(a) for a in services["proxy"]["command"]]
    config = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", _arg(cmd, "--config"))
    mounts = dict(v.split(":")[1::-1] for v in services["proxy"]["volumes"] if v.startswith("."))
    dirname, filename = posixpath.split(config)
    assert dirname in mounts, f"--config {config} is not inside a mounted folder"
    assert (DEPLOY / mounts[dirname] / filename).is_file()


def test_prometheus_and_grafana_provisioning_point_at_the_stack():
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    proxy_jobs = [
        j for j in jobs.values() if any(f"proxy:{PORT}" in t for s in j["static_configs"] for t in s["targets"])
    ]
    assert len(proxy_jobs) == 1
    assert proxy_jobs[0]["scrape_interval"] == "5s"
    assert proxy_jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert any("localhost:9090" in t for j in jobs.values() for s in j["static_configs"] for t in s["targets"])

    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert (source["type"], source["uid"], source["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")

    dash = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/dashboards.yaml").read_text())
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in _compose()["services"]["grafana"]["volumes"]}
    path = provider["options"]["path"]
    assert path in grafana_mounts, "the dashboards provider reads a folder Compose does not mount"
    assert (DEPLOY / grafana_mounts[path]).resolve() == (ROOT / "grafana" / "dashboards").resolve()
    assert (DEPLOY / grafana_mounts["/etc/grafana/provisioning"]).resolve() == (ROOT / "grafana/provisioning")


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _docker_compose_works(), reason="no `docker compose` plugin (structural checks ran)")
def test_docker_compose_config_accepts_the_file():
    _run(["docker", "compose", "-f", str(COMPOSE), "--profile", "demo", "config", "-q"])


# ---------------------------------------------------------------------------------------------- Docker


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multistage_nonroot_with_healthcheck():
    ins = _dockerfile_instructions()
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    stages = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    for i in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), ins[i][1].split()[0])
        assert image == "python:3.11-slim", f"base image {image}"
    final = ins[stages[-1] :]
    final_text = "\n".join(f"{w} {r}" for w, r in final)
    assert "apt-get install" not in final_text and "build-essential" not in final_text, "no build tools at run time"
    assert "COPY --from=" in final_text

    users = [r for w, r in final if w == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"

    health = [r for w, r in final if w == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1]
    assert [r for w, r in final if w == "EXPOSE"] == [str(PORT)]

    entry = json.loads(next(r for w, r in reversed(final) if w == "ENTRYPOINT"))
    cmd = json.loads(next(r for w, r in reversed(final) if w == "CMD"))
    argv = entry + cmd
    assert argv[:2] == ["llm-numbers-proxy", "serve"]
    assert _arg(argv, "--host") == "0.0.0.0" and _arg(argv, "--port") == str(PORT)
    config = _arg(argv, "--config")
    assert config == "/etc/llm-numbers-proxy/policy.yaml"
    # the same file Kubernetes mounts the ConfigMap over
    k8s_args = _container(_one(_load_all(K8S / "deployment.yaml"), "Deployment"))["args"]
    assert _arg([str(a) for a in k8s_args], "--config") == config
    # the image carries the policies, and the default lands at --config
    assert any(w == "COPY" and r.split()[0].rstrip("/") == "policies" for w, r in final)
    assert any(w == "COPY" and r.split() == ["policies/default.yaml", config] for w, r in final)


def test_dockerignore_keeps_what_the_image_copies():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git"} <= ignored
    copied = set()
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(p.rstrip("/") for p in rest.split()[:-1] if "*" not in p)
    assert copied, "the Dockerfile copies nothing from the context"
    for path in copied:
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"
        assert path.split("/")[0] not in ignored, f".dockerignore excludes {path}, which the Dockerfile copies"


def test_deploy_readme_tells_all_three_ways():
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "docker compose -f deploy/docker-compose.yaml --profile demo up",
        "kubectl apply -k deploy/k8s",
        "helm install",
        "redis+cluster://",
    ):
        assert needle in text, f"deploy/README.md does not mention {needle}"
