"""deploy/ files parse, point at files that exist, agree with each other on names and ports, and configure the
service through settings it actually reads (unknown RAGADAPT_* variables are silently ignored otherwise)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _interpolate(value: str) -> str:
    """Compose interpolation with an empty environment: defaults, and a stand-in for required variables."""
    value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)
    value = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"test-{m.group(1).lower()}", value)
    return re.sub(r"\$\{(\w+)\}", "", value)


def _settings_path(name: str) -> list[str]:
    """The Settings field a RAGADAPT_* variable sets; fails if the service would ignore the variable."""
    assert name.startswith("RAGADAPT_"), name
    model: type[BaseModel] | None = Settings
    parts = name.removeprefix("RAGADAPT_").lower().split("__")
    for part in parts:
        assert model is not None and part in model.model_fields, f"{name}: the service reads no such setting"
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    assert model is None, f"{name} names a settings group, not a setting"
    return parts


def _settings_from(env: dict[str, str], monkeypatch) -> Settings:
    for name in [name for name in os.environ if name.startswith("RAGADAPT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("RAGADAPT_"):
            _settings_path(name)
            monkeypatch.setenv(name, str(value))
    return Settings()


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """``(instruction, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _dockerfile_env(name: str) -> dict[str, str]:
    env = {}
    for keyword, rest in _dockerfile(name):
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# --- Dockerfiles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_what_exists_and_its_dockerignore_lets_through(name):
    allowed = {
        line[1:].strip()
        for line in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copies = [shlex.split(rest)[:-1] for keyword, rest in _dockerfile(name) if keyword == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path in the repository"
            assert source in allowed, f"{name}: COPY {source} is excluded by {name}.dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_serves_on_8080_as_non_root_with_a_healthcheck(name, monkeypatch):
    instructions = _dockerfile(name)
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_keyword.setdefault(keyword, []).append(rest)
    assert by_keyword["EXPOSE"] == ["8080"]
    assert by_keyword["USER"][-1].split(":")[0] != "0"
    assert "http://127.0.0.1:8080/healthz" in by_keyword["HEALTHCHECK"][0]
    assert json.loads(by_keyword["CMD"][-1]) == ["ragadapt", "serve"]
    settings = _settings_from({**_dockerfile_env(name), "RAGADAPT_SERVER__ADMIN_TOKEN": "t"}, monkeypatch)
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
    assert settings.data_dir == Path("/var/lib/ragadapt")
    assert settings.backbone.cache_dir == Path("/opt/ragadapt/models")
    assert settings.demo.sources == [Path("/opt/ragadapt/docs")]
    preload = next(rest for keyword, rest in instructions if keyword == "RUN" and "preload.py" in rest)
    assert preload.split()[-1] == str(settings.backbone.cache_dir), "convert the GGUF where it is read"


def test_the_cuda_image_serves_bf16_on_the_gpu(monkeypatch):
    settings = _settings_from(
        {**_dockerfile_env("Dockerfile.cuda"), "RAGADAPT_SERVER__ADMIN_TOKEN": "t"}, monkeypatch
    )
    assert (settings.backbone.device, settings.backbone.dtype) == ("cuda", "bfloat16")


def test_the_serve_command_the_images_run_exists():
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.integration
def test_preload_converts_and_loads_the_embedded_default(tmp_path):
    """The image build step, run here against the session's converted-weights cache."""
    from tests.conftest import EMBEDDED_CACHE

    done = subprocess.run(
        [sys.executable, str(DEPLOY / "preload.py"), str(EMBEDDED_CACHE)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"[0-9a-f]{8,}", done.stdout.strip().splitlines()[-1])
    assert any((EMBEDDED_CACHE / "converted").glob("*/config.json"))


# --- docker compose -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(DEPLOY / "docker-compose.yml")


@pytest.fixture(scope="module")
def included(compose) -> dict:
    services: dict = {}
    for include in compose["include"]:
        path = DEPLOY / (include["path"] if isinstance(include, dict) else include)
        assert path.is_file(), f"include {path} does not exist"
        services.update(_load(path)["services"])
    return services


def test_compose_services_depend_on_services_that_exist(compose, included):
    services = {**included, **compose["services"]}
    assert {"ragadapt", "prometheus", "grafana", "minio", "setup"} <= set(services)
    for name, service in compose["services"].items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    depends = compose["services"]["ragadapt"]["depends_on"]
    assert depends["setup"]["condition"] == "service_completed_successfully"


def test_compose_bind_mounts_and_build_point_at_files(compose):
    build = compose["services"]["ragadapt"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def test_compose_configures_ragadapt_for_the_minio_store(compose, included, monkeypatch):
    environment = {
        key: _interpolate(str(value)) for key, value in compose["services"]["ragadapt"]["environment"].items()
    }
    env = {**_dockerfile_env("Dockerfile"), **environment}
    settings = _settings_from(env, monkeypatch)
    assert settings.store.backend == "s3" and settings.store.secure is False
    host, port = settings.store.endpoint.split(":")
    assert host == "minio" and port == "9000"
    assert any(port.endswith(":9000") for port in included["minio"]["ports"])
    # The service's credentials are the user that deploy/minio's setup creates, with the same defaults.
    setup = {key: _interpolate(str(value)) for key, value in included["setup"]["environment"].items()}
    assert setup["BUCKET"] == settings.store.bucket
    assert setup["ACCESS_KEY"] == settings.store.access_key
    assert setup["SECRET_KEY"] == settings.store.secret_key.get_secret_value()
    assert settings.server.admin_token.get_secret_value() == "test-ragadapt_admin_token"
    assert compose["services"]["ragadapt"]["ports"][0].endswith(":8080")


def test_compose_ray_profile_runs_a_head_the_service_reaches_with_its_token(compose, monkeypatch):
    ragadapt, head = compose["services"]["ragadapt"], compose["services"]["ray-head"]
    assert head["profiles"] == ["ray"] and "profiles" not in ragadapt
    assert head["image"] == ragadapt["image"]  # a run's actor imports ragadapt and loads its backbone
    command = head["command"]
    assert command[:4] == ["ray", "start", "--head", "--block"]
    port = next(arg.split("=")[1] for arg in command if arg.startswith("--port="))
    assert ragadapt["depends_on"]["ray-head"] == {"condition": "service_healthy", "required": False}
    assert head["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
    environment = {key: _interpolate(str(value)) for key, value in ragadapt["environment"].items()}
    local = _settings_from({**_dockerfile_env("Dockerfile"), **environment}, monkeypatch)
    assert (local.runs.executor, local.indexing.executor) == ("local", "local")  # the default needs no Ray
    environment |= {"RAGADAPT_RUNS__EXECUTOR": "ray", "RAGADAPT_INDEXING__EXECUTOR": "ray"}
    on_ray = _settings_from({**_dockerfile_env("Dockerfile"), **environment}, monkeypatch)
    assert on_ray.ray.address == f"ray-head:{port}"
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        assert (
            str(ragadapt["environment"][name]).split(":")[0] == str(head["environment"][name]).split(":")[0]
        )


def test_prometheus_scrapes_ragadapt(compose):
    config = _load(DEPLOY / "prometheus" / "prometheus.yml")
    mounted = [v for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./prometheus/")]
    assert mounted == ["./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "ragadapt")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["ragadapt:8080"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    datasources = DEPLOY / "grafana" / "provisioning" / "datasources"
    providers = DEPLOY / "grafana" / "provisioning" / "dashboards"
    assert mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    [datasource] = [d for path in datasources.glob("*.yml") for d in _load(path)["datasources"]]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert any(port.endswith(":9090") for port in compose["services"]["prometheus"]["ports"])
    [provider] = [p for path in providers.glob("*.yml") for p in _load(path)["providers"]]
    dashboards_in_container = provider["options"]["path"]
    host_dir = next(host for host, container in mounts.items() if container == dashboards_in_container)
    assert (DEPLOY / host_dir / "ragadapt.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/ragadapt.json"


# --- Kubernetes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    kustomization = _load(DEPLOY / "k8s" / "kustomization.yaml")
    objects = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()):
            objects[document["kind"]] = document
    return objects


def test_k8s_deployment_probes_env_and_volumes(k8s):
    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8080}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    sources = {next(iter(source)): source[next(iter(source))]["name"] for source in container["envFrom"]}
    assert sources == {
        "configMapRef": k8s["ConfigMap"]["metadata"]["name"],
        "secretRef": k8s["Secret"]["metadata"]["name"],
    }
    volumes = {volume["name"] for volume in pod["spec"]["volumes"]}
    assert {mount["name"] for mount in container["volumeMounts"]} <= volumes
    data_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    assert data_mount == k8s["ConfigMap"]["data"]["RAGADAPT_DATA_DIR"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_k8s_service_routes_to_the_pods(k8s):
    service = k8s["Service"]["spec"]
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == "http"


def test_k8s_configmap_and_secret_make_valid_settings(k8s, monkeypatch):
    env = {**k8s["ConfigMap"]["data"], **k8s["Secret"]["stringData"]}
    settings = _settings_from({key: str(value) for key, value in env.items()}, monkeypatch)
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
    assert settings.store.backend == "s3" and settings.store.endpoint
    assert settings.server.admin_token is not None and settings.store.secret_key is not None
    assert set(k8s["Secret"]["stringData"]) == {
        "RAGADAPT_SERVER__ADMIN_TOKEN",
        "RAGADAPT_STORE__ACCESS_KEY",
        "RAGADAPT_STORE__SECRET_KEY",
    }


@pytest.fixture(scope="module")
def k8s_ray() -> dict[str, list[dict]]:
    """The objects deploy/k8s-ray adds, and its patches, by kind."""
    overlay = DEPLOY / "k8s-ray"
    kustomization = _load(overlay / "kustomization.yaml")
    assert "../k8s" in kustomization["resources"]
    objects: dict[str, list[dict]] = {}
    paths = [r for r in kustomization["resources"] if r != "../k8s"] + [
        p["path"] for p in kustomization["patches"]
    ]
    for path in paths:
        for document in yaml.safe_load_all((overlay / path).read_text()):
            objects.setdefault(document["kind"], []).append(document)
    return objects


def _token_refs(container: dict) -> set[tuple[str, str]]:
    env = {item["name"]: item for item in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    return {(ref["name"], ref["key"])}


def test_k8s_ray_overlay_points_the_service_at_the_rayclusters_head(k8s, k8s_ray, monkeypatch):
    [cluster] = k8s_ray["RayCluster"]
    [secret] = k8s_ray["Secret"]
    [config_patch] = k8s_ray["ConfigMap"]
    [deployment_patch] = k8s_ray["Deployment"]
    assert config_patch["metadata"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    assert deployment_patch["metadata"]["name"] == k8s["Deployment"]["metadata"]["name"]
    env = {**k8s["ConfigMap"]["data"], **config_patch["data"], **k8s["Secret"]["stringData"]}
    settings = _settings_from({key: str(value) for key, value in env.items()}, monkeypatch)
    assert (settings.runs.executor, settings.indexing.executor) == ("ray", "ray")
    host, port = settings.ray.address.split(":")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert host == f"{cluster['metadata']['name']}-head-svc"  # the Service KubeRay creates for the head
    assert int(port) == next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs")
    [serving] = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert head["image"] == serving["image"]
    workers = {
        g["groupName"]: g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]
    }
    assert (
        workers["cpu"]["image"] == serving["image"]
        and "nvidia.com/gpu" in workers["gpu"]["resources"]["limits"]
    )
    # One token: the head, every worker group and the serving pods read the same key of the same Secret.
    [patched] = deployment_patch["spec"]["template"]["spec"]["containers"]
    refs = _token_refs(head) | _token_refs(patched) | set().union(*map(_token_refs, workers.values()))
    assert refs == {(secret["metadata"]["name"], next(iter(secret["stringData"])))}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_ray_overlay():
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s-ray")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    kinds = [document["kind"] for document in yaml.safe_load_all(done.stdout)]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "RayCluster", "Secret", "Secret", "Service"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests():
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    kinds = [document["kind"] for document in yaml.safe_load_all(done.stdout)]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Secret", "Service"]


def test_unknown_settings_variables_are_caught():
    with pytest.raises(AssertionError, match="reads no such setting"):
        _settings_path("RAGADAPT_STORE__ENDPOINTS")
    assert _settings_path("RAGADAPT_STORE__ENDPOINT") == ["store", "endpoint"]
