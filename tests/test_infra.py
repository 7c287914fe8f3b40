"""Every YAML under infra/ loads into its stage's typed config (unknown keys would fail); the Dockerfile installs from
the lock and copies only what the repository has; the KubeRay curation manifests parse, name that image, share one
workspace volume, and schedule a `linernotes run` of a spec that validates."""

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

import pytest

from pipelines.stages.clean import CleanConfig
from pipelines.experiments.clean_evaluate import EvaluateConfig
from pipelines.config import load_config
from pipelines.stages.ingest.stage import IngestConfig
from pipelines.stages.shard.stage import ShardConfig
from training.config import TrainConfig

INFRA = Path(__file__).resolve().parents[1] / "infra"
MODELS = {"beam": IngestConfig, "shard": ShardConfig, "train": TrainConfig, "clean": CleanConfig,
          "clean-evaluate": EvaluateConfig}


# kuberay/: tests/training/test_submit.py; runs/ (run specs): tests/pipelines/test_run_spec.py; dagster/ (instance
# configs): tests/pipelines/test_orchestration.py
@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*.yaml")
                                        if p.parent.name not in ("kuberay", "runs", "dagster")),
                         ids=lambda p: str(p.relative_to(INFRA)))
def test_infra_yaml_loads(path):
    key = "beam" if path.parent.name == "beam" else path.stem.split("-")[0]
    if path.stem.startswith("clean-evaluate"):
        key = "clean-evaluate"
    # clean run takes its trusted reference set on the command line (--reference-track), as the file says
    defaults = {"reference_tracks": ["reference-track"]} if key == "clean" else {}
    config = load_config(MODELS[key], path, **defaults)
    if key == "beam":
        assert config.beam_options and config.beam_options[0].startswith("--runner=")


# infra/docker and the curation manifests of infra/kuberay ----------------------------------------------------------

ROOT = INFRA.parent
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBERAY = INFRA / "kuberay"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def _image() -> str:
    """The image the Dockerfile builds, from its build command (`docker build ... -t IMAGE:TAG`)."""
    return re.search(r"^#.*\s-t (\S+):", DOCKERFILE.read_text(), re.M).group(1)


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]


def _one(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"one {kind} expected, found {len(found)}"
    return found[0]


def _containers(doc: object) -> list[dict]:
    """Every container of every pod template anywhere in a manifest."""
    if isinstance(doc, dict):
        return [c for c in doc.get("containers", []) if isinstance(c, dict)] + \
            [c for value in doc.values() for c in _containers(value)]
    if isinstance(doc, list):
        return [c for value in doc for c in _containers(value)]
    return []


def test_the_dockerfile_copies_only_files_the_repository_has_and_the_context_lets_in():
    copies = [args.split() for op, args in _instructions(DOCKERFILE) if op == "COPY"]
    sources = [src for parts in copies if not any(p.startswith("--from=") for p in parts)
               for src in [p for p in parts if not p.startswith("--")][:-1]]
    assert {"pyproject.toml", "uv.lock", "pipelines/"} <= set(sources)
    ignore = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        matching = [p for p in ignore if fnmatch.fnmatch(source.rstrip("/"), p.lstrip("!").rstrip("/"))]
        assert matching and matching[-1].startswith("!"), f"COPY {source}: left out of the build context"
    for package in ("provenance", "cleaning", "training", "pipelines"):  # every package the project installs
        assert f"{package}/" in sources, package


def test_the_dockerfile_installs_from_the_lock_with_the_makefiles_uv_as_a_non_root_user():
    steps = _instructions(DOCKERFILE)
    runs = [args for op, args in steps if op == "RUN"]
    syncs = [run for run in runs if "uv sync" in run]
    assert syncs and all("--frozen" in run or "--locked" in run for run in syncs), syncs
    assert any("--no-install-project" in run for run in syncs) and "--no-editable" in syncs[-1]
    # nothing is installed beside the lock: the only pip install is uv itself, at the Makefile's version
    installs = [run for run in runs if re.search(r"\bpip install\b", run)]
    assert len(installs) == 1 and re.search(r"\buv==\$\{UV_VERSION\}", installs[0]), installs
    makefile_uv = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"UV_VERSION={makefile_uv}" in [args for op, args in steps if op == "ARG"]
    assert sum(op == "FROM" for op, _ in steps) >= 2  # multi-stage: the build tools stay out of the image
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert int(users[-1].split(":")[0]) >= 1000
    from provenance.store import GIT_COMMIT_ENV

    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]  # the image's own stage
    assert "GIT_COMMIT" in [args.split("=")[0] for op, args in final if op == "ARG"]
    assert f"{GIT_COMMIT_ENV}=${{GIT_COMMIT}}" in [word for op, args in final if op == "ENV" for word in args.split()]
    entrypoint = json.loads(next(args for op, args in steps if op == "ENTRYPOINT"))
    assert entrypoint == ["linernotes"] and "linernotes" in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_curation_raycluster_autoscales_cpu_workers_over_a_shared_workspace(tmp_path):
    docs = _documents("raycluster-curation.yaml")
    claim, specs, cluster = _one(docs, "PersistentVolumeClaim"), _one(docs, "ConfigMap"), _one(docs, "RayCluster")
    assert (claim["apiVersion"], specs["apiVersion"], cluster["apiVersion"]) == ("v1", "v1", "ray.io/v1")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by the head and every worker
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    assert spec["rayVersion"] == next(p["version"] for p in lock["package"] if p["name"] == "ray")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the stages' Ray work goes to workers
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]  # room to scale
        for container in _containers(group):
            assert "nvidia.com/gpu" not in container["resources"]["limits"]  # CPU workers
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    mounts = set()
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert list(claims.values()) == [claim["metadata"]["name"]]
        mounts |= {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in claims}
    assert len(mounts) == 1  # one path on every pod
    shared = Path(mounts.pop())
    for name, text in specs["data"].items():  # the specs' workspace and delivery are on the shared volume
        spec_file = yaml.safe_load(text)
        assert Path(spec_file["workspace"]).is_relative_to(shared), name
        assert Path(spec_file["delivery"]).is_relative_to(shared), name
    for container in _containers(cluster):
        assert container["image"].startswith(_image() + ":"), container["image"]


def test_the_cronjob_creates_a_rayjob_that_runs_a_valid_spec_on_the_curation_cluster(tmp_path):
    import typer.main

    from pipelines.cli import app
    from pipelines.runspec import load_spec

    cluster_docs = _documents("raycluster-curation.yaml")
    cluster, specs = _one(cluster_docs, "RayCluster"), _one(cluster_docs, "ConfigMap")
    docs = _documents("cronjob-curation.yaml")
    cron = _one(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container.get("command", []) + container["args"]
    manifest = Path(args[args.index("-f") + 1])
    assert "create" in args  # generateName: a new RayJob each time
    mount = next(m for m in container["volumeMounts"] if manifest.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    holder = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    rayjob = yaml.safe_load(holder["data"][manifest.name])
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob") and rayjob["metadata"]["generateName"]
    # the service account may create it
    role, binding = _one(docs, "Role"), _one(docs, "RoleBinding")
    assert any("ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
               for rule in role["rules"])
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]

    job = rayjob["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "shutdownAfterJobFinishes" not in job  # the standing cluster stays up
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["linernotes", "run"]
    spec_path = Path(argv[2])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    spec_mount = next(m for c in head["containers"] for m in c["volumeMounts"] if spec_path.is_relative_to(m["mountPath"]))
    spec_volume = next(v for v in head["volumes"] if v["name"] == spec_mount["name"])
    assert spec_volume["configMap"]["name"] == specs["metadata"]["name"]
    spec_file = tmp_path / spec_path.name
    spec_file.write_text(specs["data"][str(spec_path.relative_to(spec_mount["mountPath"]))])
    (tmp_path / "delivery").mkdir()
    loaded = load_spec(spec_file, [f"delivery={tmp_path / 'delivery'}"])  # the delivery is on the cluster's volume
    assert list(loaded.stages) == ["ingest", "clean", "shard"]
    typer.main.get_command(app).commands["run"].make_context("run", argv[2:])  # its options are `run`'s

    raycron = _one(_documents("raycronjob-curation.yaml"), "RayCronJob")
    assert raycron["apiVersion"] == "ray.io/v1"
    assert raycron["spec"]["jobTemplate"] == job and raycron["spec"]["schedule"] == cron["spec"]["schedule"]
    assert raycron["spec"]["timeZone"] == cron["spec"]["timeZone"]


def test_every_kuberay_manifest_names_the_image_the_dockerfile_builds():
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _documents(path.name):
            for container in _containers(doc):
                if "kubectl" not in container["image"]:
                    assert container["image"].startswith(_image() + ":"), (path.name, container["image"])
