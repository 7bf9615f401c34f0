"""The stage commands docs/cluster.md tells users to submit parse with the stages' real CLIs and build valid
configs (flags, `--set` keys, preset and config files), so the walkthrough cannot drift from the code."""

from __future__ import annotations

import re
import shlex

import pytest

from sr_ray.cli import build_parser
from tests.cluster.conftest import REPO

# pipelines/<stage>.py takes the same flags as `sr-ray <command>`
COMMANDS = {"preprocess": "preprocess", "rollout": "rollout", "fit_probe": "fit-probe", "train_sapt": "train",
            "evaluate": "evaluate", "serve": "serve"}

PATH_FIELDS = {"work_dir", "data_dir", "out_dir", "out", "processed_dir", "probe", "train_data", "rollout", "audit_log"}


def documented_submissions() -> dict[str, list[str]]:
    """{stage: argv} of every `submit python pipelines/<stage>.py ...` line, shell variables expanded."""
    text = (REPO / "docs/cluster.md").read_text().replace("\\\n", " ")
    variables = {"TRACKING": "http://10.0.0.1:5000"}
    for name, value in re.findall(r'^(\w+)="([^"]*)"$', text, re.MULTILINE):
        variables[name] = value
    for _ in range(2):  # W refers to TRACKING
        variables = {k: re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], v) for k, v in variables.items()}
    found = {}
    for line in re.findall(r"^submit (python pipelines/.*)$", text, re.MULTILINE):
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line.split("  #")[0]))
        found[argv[1].removeprefix("pipelines/").removesuffix(".py")] = argv[2:]
    return found


def build_config(command: str, args):
    if command == "preprocess":
        from sr_ray.data.cli import config_from_args

        return config_from_args(args)
    if command == "evaluate":
        from sr_ray.eval.cli import evaluate_config

        return evaluate_config(args)
    if command == "serve":
        from sr_ray.serve.cli import config_from_args

        return config_from_args(args)
    from sr_ray.train.cli import stage_config

    return stage_config(command, args)


def test_docs_submit_every_stage_in_order():
    assert list(documented_submissions()) == list(COMMANDS)


@pytest.mark.parametrize("stage", list(COMMANDS))
def test_documented_stage_command_builds_a_valid_config(stage, monkeypatch):
    monkeypatch.chdir(REPO)  # `ray job submit --working-dir .` runs the entrypoint in the synced tree
    argv = documented_submissions()[stage]
    assert (REPO / "pipelines" / f"{stage}.py").exists()
    args = build_parser().parse_args([COMMANDS[stage], *argv])
    cfg = build_config(COMMANDS[stage], args)
    for path in re.findall(r"(configs/\S+\.yaml)", " ".join(argv)):
        assert (REPO / path).is_file(), path
    if "--preset" in argv:
        assert cfg.model == "llava-hf/llava-1.5-7b-hf" and cfg.model in (REPO / "cluster.yaml").read_text()
    # Every file a stage reads or writes is on the shared file system: a relative path would land in the
    # job's own unpacked working directory, which no other job or node sees.
    paths = {k: v for k, v in vars(cfg).items() if k in PATH_FIELDS and v is not None}
    assert paths and all(str(p).startswith("/mnt/shared/")
                         for v in paths.values() for p in (v if isinstance(v, list) else [v])), paths
