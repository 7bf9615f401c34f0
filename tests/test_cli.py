"""`sr-ray`: the lazily built parser lists every command, `--version` / `--log-level`, and config values
type-checked before anything starts (a usage error, exit 2, one line). The start-up time itself is a
benchmark (benchmarks/cli_help.py), not a test."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from sr_ray import cli
from sr_ray.config import load
from sr_ray.config_types import ConfigError
from sr_ray.train.cli import stage_config
from sr_ray.train.config import SaptConfig

REPO = Path(__file__).resolve().parents[1]


def registered(module: str) -> dict[str, str]:
    """command -> help of what `module.add_commands` registers."""
    import importlib

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench = sub.add_parser("bench").add_subparsers()
    importlib.import_module(module).add_commands(sub, bench)
    return {a.dest: a.help for a in sub._choices_actions if a.dest != "bench"}


def test_command_table_matches_what_the_modules_register():
    for module in cli.ALL_MODULES:
        expected = {name: text for name, (owner, text) in cli.COMMANDS.items() if owner == module}
        assert registered(module) == expected, module


def test_help_lists_every_command_without_importing_the_areas():
    code = ("import sys; from sr_ray.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in ('torch', 'ray', 'transformers', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")
    assert all(name in out for name in cli.COMMANDS)


def test_version_and_log_level(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sr-ray {version('sr_ray')}"
    args = cli.build_parser(cli.modules_for("data")).parse_args(["--log-level", "debug", "data", "stats", "x"])
    assert args.log_level == "DEBUG"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--log-level", "loud", "data", "stats", "x"])
    assert exit_.value.code == 2


def test_log_level_reaches_sr_ray_loggers_and_ray_workers(tmp_path, monkeypatch):
    import logging

    from sr_ray.runtime import ray_runtime_env

    monkeypatch.setenv("SR_RAY_LOG_LEVEL", "INFO")
    with pytest.raises(FileNotFoundError):  # the command itself fails; the level was set before it ran
        cli.main(["--log-level", "warning", "data", "stats", str(tmp_path)])
    assert logging.getLogger("sr_ray.demo").getEffectiveLevel() == logging.WARNING
    assert ray_runtime_env()["env_vars"]["SR_RAY_LOG_LEVEL"] == "WARNING"  # workers log at the same level
    assert logging.getLogger("sr_ray").handlers  # progress lines go to stderr, results stay on stdout
    logging.getLogger("sr_ray").setLevel(logging.INFO)


def test_set_values_arrive_typed():
    parser = cli.build_parser(cli.modules_for("train"))
    cfg = stage_config("train", parser.parse_args(["train", "--config", "", "--set", "lr=2e-4", "--set", "epochs=3"]))
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float) and cfg.epochs == 3  # YAML 1.1 reads 2e-4 as a string
    cfg = load(SaptConfig, overrides={"betas": [0.8, 0.9], "run_name": None})
    assert cfg.betas == (0.8, 0.9)


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "", "--set", "lr=abc"], "lr: expected float, got 'abc' (str)"),
    (["train", "--config", "", "--set", "epochs=ten"], "epochs: expected int, got 'ten' (str)"),
    (["train", "--config", "", "--set", "epochs=0"], "epochs must be >= 1"),
    (["train", "--config", "", "--set", "bundle_from=worst"], "bundle_from: expected one of ['best', 'last']"),
    (["rollout", "--config", "", "--set", "harmful=[{source: advbench, train: many}]"], "harmful[0].train: expected int"),
    (["serve", "--no-guard", "--set", "port=abc"], "port: expected int, got 'abc' (str)"),
    (["serve", "--no-guard", "--set", "model_deployment.max_replicas=-3"], "model_deployment.max_replicas must be >= 1"),
    (["serve", "--no-guard", "--port", "70000"], "port must be 1-65535"),
])
def test_bad_config_values_are_usage_errors_before_anything_starts(argv, message, capsys, monkeypatch):
    import ray

    import sr_ray.runtime

    def started(*args, **kwargs):  # Ray may already be up from other tests: watch the starters instead
        raise AssertionError("Ray was started before the config was checked")

    monkeypatch.setattr(sr_ray.runtime, "ensure_ray", started)
    monkeypatch.setattr(ray, "init", started)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err and "Traceback" not in err


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)  # library callers that catch ValueError keep working


def test_each_attack_shows_only_its_own_flags():
    parser = cli.build_parser(cli.modules_for("attack"))
    kinds = next(a for a in parser._subparsers._group_actions[0].choices["attack"]._actions
                 if isinstance(a, argparse._SubParsersAction)).choices
    flags = {kind: {o for a in p._actions for o in a.option_strings} for kind, p in kinds.items()}
    assert "--epsilon" in flags["pgd"] and "--bundle" in flags["pgd-adaptive"]
    assert not {"--epsilon", "--step-size", "--clean-image", "--bundle"} & flags["gcg"]
    assert not {"--search-width", "--topk"} & flags["pgd"]
    args = parser.parse_args(["attack", "gcg", "--config", "", "--steps", "5", "--topk", "8"])
    from sr_ray.eval.cli import attack_config

    cfg = attack_config(args)
    assert (cfg.attack, cfg.gcg.steps, cfg.gcg.topk) == ("gcg", 5, 8)


def test_pipeline_entrypoints_name_themselves_and_refuse_bad_values(capsys):
    from sr_ray.train.cli import PIPELINE_SCRIPTS, pipeline_main

    for command, script in PIPELINE_SCRIPTS.items():
        assert f"pipeline_main({command!r})" in (REPO / "pipelines" / script).read_text().replace('"', "'")
    with pytest.raises(SystemExit) as exit_:
        pipeline_main("train", ["--help"])
    assert capsys.readouterr().out.startswith("usage: pipelines/train_sapt.py")
    with pytest.raises(SystemExit) as exit_:
        pipeline_main("train", ["--config", "", "--set", "lr=abc"])
    assert exit_.value.code == 2 and "pipelines/train_sapt.py: error: lr: expected float" in capsys.readouterr().err


def test_benchmark_readme_commands_parse():
    """The commands benchmarks/README.md gives are accepted as written (they once lacked the required --out)."""
    import re
    import shlex

    commands = re.findall(r"`(sr-ray bench [^`]+)`", (REPO / "benchmarks/README.md").read_text())
    assert len(commands) >= 3
    parser = cli.build_parser(cli.modules_for("bench"))
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.out, command


@pytest.mark.parametrize("command, yaml_text, message", [
    ("evaluate", "limit: many\n", "limit: expected int | None, got 'many'"),
    ("attack pgd", "pgd: {steps: lots}\n", "pgd.steps: expected int, got 'lots'"),
    ("preprocess", "max_side: big\n", "max_side: expected int, got 'big'"),
])
def test_every_stage_checks_its_yaml_values(command, yaml_text, message, tmp_path, capsys):
    """evaluate / attack / preprocess build their YAML + flags through the same type check: exit 2."""
    (tmp_path / "c.yaml").write_text(yaml_text)
    argv = [*command.split(), "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv + (["--bundle", "b"] if command == "evaluate" else []))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
