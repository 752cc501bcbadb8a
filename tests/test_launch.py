"""launch/ manifests: every YAML parses and has what its tool needs; entrypoints name real recipes.

KubeRay field names are from ray-project/kuberay ray-operator/config/crd/bases (ray.io_rayjobs,
ray.io_raycronjobs); cluster.yaml is validated against the schema Ray itself ships.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from zsaq_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
IMAGE_ROOT = "/opt/zsaq/"  # where docker/Dockerfile puts the repository's configs/ and launch/

sys.path.insert(0, str(LAUNCH))
import batch_quantize  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from test_deploy import pinned, pyproject  # noqa: E402


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((LAUNCH / name).read_text()) if d is not None]


def repo_path(image_path: str) -> Path:
    """A path inside the image, as the repository file the image was built from."""
    assert image_path.startswith(IMAGE_ROOT), f"{image_path}: recipes live under {IMAGE_ROOT} in the image"
    return ROOT / image_path.removeprefix(IMAGE_ROOT)


def check_image(image: str) -> None:
    """Images are docker/Dockerfile builds tagged <version>-<cpu|cuXYZ> of this package."""
    m = re.search(r"/zsaq-dist:(\d+\.\d+\.\d+)-(cpu|cu\d+)$", image)
    assert m, f"{image}: expected REGISTRY/zsaq-dist:VERSION-VARIANT"
    assert m.group(1) == pyproject()["version"], f"{image} does not match version {pyproject()['version']}"


def check_pod(template: dict, claims: set[str], gpu: bool) -> str:
    """Containers with image and resources; mounts resolve to pod volumes; returns the model mount."""
    spec = template["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    model_mount = None
    for c in spec["containers"]:
        check_image(c["image"])
        res = c["resources"]
        assert {"requests", "limits"} <= set(res) and "cpu" in res["requests"] and "memory" in res["limits"]
        assert ("nvidia.com/gpu" in res["limits"]) == gpu
        for m in c["volumeMounts"]:
            vol = volumes[m["name"]]  # KeyError = a mount of an undeclared volume
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims
                model_mount = m["mountPath"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert model_mount, "no PVC mounted: where would models and checkpoints live?"
    return model_mount


def check_rayjob_spec(spec: dict, claims: set[str]) -> str:
    """The RayJob spec fields KubeRay needs; returns the model mount path shared by all pods."""
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert pinned("ray").contains(cluster["rayVersion"]), cluster["rayVersion"]
    mounts = {check_pod(cluster["headGroupSpec"]["template"], claims, gpu=False)}
    assert isinstance(cluster["headGroupSpec"]["rayStartParams"], dict)
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        mounts.add(check_pod(group["template"], claims, gpu=True))
    assert len(mounts) == 1, f"head and workers must mount the models at one path, got {mounts}"
    return mounts.pop()


def pvc_claims() -> set[str]:
    (pvc,) = load("kuberay/pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    return {pvc["metadata"]["name"]}


def test_every_launch_yaml_parses():
    files = sorted(LAUNCH.rglob("*.yaml"))
    assert {p.name for p in files} >= {"rayjob.yaml", "cronjob.yaml", "pvc.yaml", "cluster.yaml"}
    for p in files:
        assert load(str(p.relative_to(LAUNCH))), f"{p} is empty"


def test_rayjob_manifest():
    (job,) = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    mount = check_rayjob_spec(job["spec"], pvc_claims())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["zsaq", "quantize"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(repo_path(argv[2]), sets)  # the recipe exists and validates with the overrides
    assert cfg.model.path.startswith(mount + "/") and cfg.output.dir.startswith(mount + "/")
    assert cfg.dist.use_gpu and cfg.dist.num_workers == sum(
        g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )


def test_raycronjob_manifest():
    (cron,) = load("kuberay/cronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert re.fullmatch(r"(\S+\s+){4}\S+", cron["spec"]["schedule"]), "five cron fields"
    template = cron["spec"]["jobTemplate"]
    assert "spec" not in template, "RayCronJob.jobTemplate holds RayJob spec fields directly"
    mount = check_rayjob_spec(template, pvc_claims())
    # Daily schedule: a run must end before the next one starts (they would pick the same models).
    assert cron["spec"]["schedule"].split()[2:] == ["*", "*", "*"]
    assert 0 < template["activeDeadlineSeconds"] < 24 * 3600
    argv = shlex.split(template["entrypoint"])
    assert argv[0] == "python" and repo_path(argv[1]) == LAUNCH / "batch_quantize.py"
    args = batch_quantize._parse(argv[2:])
    assert args.models.startswith(mount)
    item = batch_quantize.Pending(f"{mount}/Model", f"{mount}/Model{args.suffix}")
    cmd = batch_quantize.quantize_command("zsaq", str(repo_path(args.config)), item, args.sets)
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    cfg = load_config(cmd[2], sets)
    assert cfg.model.path == item.source and cfg.output.dir == item.output


@pytest.mark.parametrize(
    "breakage",
    [
        lambda spec: spec["rayClusterSpec"].update(rayVersion="2.59.0"),  # not the pinned Ray
        lambda spec: spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].pop("volumes"),
        lambda spec: spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            image="rayproject/ray:2.60.0"
        ),
        lambda spec: spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][
            0
        ].update(mountPath="/data"),
        lambda spec: spec.update(shutdownAfterJobFinishes=False),
    ],
)
def test_rayjob_check_catches_broken_manifests(breakage):
    """The manifest checks are live: each breakage of a good RayJob is reported."""
    (job,) = load("kuberay/rayjob.yaml")
    spec = copy.deepcopy(job["spec"])
    breakage(spec)
    with pytest.raises((AssertionError, KeyError)):
        check_rayjob_spec(spec, pvc_claims())


def test_entrypoint_check_catches_a_missing_recipe():
    """The recipe check is live: an entrypoint naming a recipe the image lacks fails."""
    with pytest.raises(Exception, match="not found"):
        load_config(repo_path("/opt/zsaq/configs/no-such-recipe.yaml"), [])


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = load("cluster.yaml")
    jsonschema.validate(cfg, ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # as `ray up` does, after merging defaults
    check_image(cfg["docker"]["image"])
    assert any("pip install ~/zsaq_dist" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/zsaq_dist"] == "."
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the unauthenticated Job API must not listen on the network"


def test_cluster_schema_check_catches_a_misspelled_key():
    (cfg,) = load("cluster.yaml")
    bad = copy.deepcopy(cfg)
    bad["docker"]["imag"] = bad["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError, match="imag"):
        jsonschema.validate(bad, ray_schema())


def test_submit_script_defaults_to_localhost():
    text = (LAUNCH / "submit.sh").read_text()
    defaults = re.findall(r'^address="([^"]*)"', text, re.M)
    assert defaults == ["http://127.0.0.1:8265"]
    assert (LAUNCH / "submit.sh").stat().st_mode & 0o111, "submit.sh must be executable"
