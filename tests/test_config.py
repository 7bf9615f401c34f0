"""The one config loader (`sr_ray.config`): YAML < preset < flags < `--set a.b=value`, unknown keys and
wrong types refused by name before anything starts, and each default defined once (in the dataclass)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from sr_ray import cli
from sr_ray.config import REPO_ROOT, _FLAG, load
from sr_ray.config_types import ConfigError, build
from sr_ray.data.config import PreprocessConfig
from sr_ray.eval.attacks.runner import AttackConfig
from sr_ray.eval.runner import EvaluateConfig
from sr_ray.serve.config import ServeConfig
from sr_ray.train.config import ProbeFitConfig, RolloutConfig, SaptConfig

# every stage YAML in configs/ and the class it configures
STAGE_FILES = {"preprocess.yaml": PreprocessConfig, "rollout.yaml": RolloutConfig, "fit_probe.yaml": ProbeFitConfig,
               "train_sapt.yaml": SaptConfig, "evaluate.yaml": EvaluateConfig, "attack.yaml": AttackConfig,
               "serve.yaml": ServeConfig}
REQUIRED = {PreprocessConfig: {"data_dir": "data"}}  # fields without a default


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser(cli.modules_for(argv[0])).parse_args(argv)


def test_unknown_key_is_refused_naming_it_and_the_valid_ones(tmp_path):
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['epochz'\]; valid keys: \[.*'epochs'"):
        load(SaptConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"unknown keys \['limits.max_tokenz'\]; valid keys of limits: \[.*'max_tokens'"):
        load(ServeConfig, sets=["limits.max_tokenz=3"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load(ServeConfig, sets=["limits"])


def test_dotted_override_of_a_nested_field_keeps_the_sections_other_values():
    cfg = load(ServeConfig, sets=["ingress_deployment.num_cpus=0.2", "guard.threshold_bounds=[0.2, 0.3]"])
    assert cfg.ingress_deployment.num_cpus == 0.2
    # the rest of the section keeps the ingress's own defaults (not ScaleConfig's: 32 / 256, not 8 / 16)
    assert (cfg.ingress_deployment.target_ongoing_requests, cfg.ingress_deployment.max_ongoing_requests) == (32, 256)
    assert cfg.guard.threshold_bounds == (0.2, 0.3) and cfg.guard.mode == "inplace"
    ev = load(EvaluateConfig, sets=["awareness.limit=0", "limit=40"])
    assert (ev.awareness.limit, ev.awareness.max_new_tokens, ev.limit) == (0, 128, 40)
    at = load(AttackConfig, sets=["pgd.steps=5", "gcg.topk=8"])
    assert (at.pgd.steps, at.pgd.batch_size, at.gcg.topk) == (5, 4, 8)


def test_flags_are_sugar_for_the_same_fields():
    by_flags = parse(["evaluate", "--config", "", "--limit", "40", "--benchmarks", "advbench,harmless",
                      "--attacks", "prefill", "--split", "all", "--awareness-limit", "3", "--out", "o"])
    by_set = parse(["evaluate", "--config", "", "--set", "limit=40", "--set", "benchmarks=[advbench, harmless]",
                    "--set", "attacks=[prefill]", "--set", "split=all", "--set", "awareness.limit=3", "--set", "out=o"])
    from sr_ray.eval.cli import evaluate_config

    assert evaluate_config(by_flags) == evaluate_config(by_set)


def test_preset_and_override_order(tmp_path):
    """YAML < preset (shared `model`, then the stage's section) < flags < --set."""
    (tmp_path / "train.yaml").write_text("epochs: 3\nlr: 0.001\nval_limit: 5\nmodel: smol-llava\n")
    (tmp_path / "p.yaml").write_text("model: tiny-llava\ntrain: {epochs: 5, lr: 0.002}\nrollout: {max_new_tokens: 7}\n")
    base = ["train", "--config", str(tmp_path / "train.yaml"), "--preset", str(tmp_path / "p.yaml")]
    from sr_ray.train.cli import stage_config

    cfg = stage_config("train", parse(base))
    assert (cfg.epochs, cfg.lr, cfg.val_limit, cfg.model) == (5, 0.002, 5, "tiny-llava")
    cfg = stage_config("train", parse([*base, "--epochs", "6"]))
    assert cfg.epochs == 6
    cfg = stage_config("train", parse([*base, "--epochs", "6", "--set", "epochs=7", "--set", "epochs=8"]))
    assert cfg.epochs == 8  # the last --set wins
    rollout = stage_config("rollout", parse(["rollout", "--config", "", "--preset", str(tmp_path / "p.yaml")]))
    assert (rollout.max_new_tokens, rollout.model) == (7, "tiny-llava")  # a stage takes only its own section
    (tmp_path / "bad.yaml").write_text("trian: {epochs: 5}\n")
    with pytest.raises(ConfigError, match=r"preset .*bad.yaml: unknown keys \['trian'\]"):
        stage_config("train", parse(["train", "--config", "", "--preset", str(tmp_path / "bad.yaml")]))


def test_the_environment_sits_between_the_preset_and_the_flags(tmp_path, monkeypatch):
    """SR_RAY_<SECTION>__<FIELD>: over the preset, under flags and --set, only for its own section."""
    from sr_ray.train.cli import stage_config

    (tmp_path / "p.yaml").write_text("train: {epochs: 5, lr: 0.002}\n")
    monkeypatch.setenv("SR_RAY_TRAIN__EPOCHS", "9")
    monkeypatch.setenv("SR_RAY_TRAIN__LR", "3e-3")
    monkeypatch.setenv("SR_RAY_ROLLOUT__MAX_NEW_TOKENS", "11")
    base = ["train", "--config", "", "--preset", str(tmp_path / "p.yaml")]
    assert (stage_config("train", parse(base)).epochs, stage_config("train", parse(base)).lr) == (9, 3e-3)
    assert stage_config("train", parse([*base, "--epochs", "6"])).epochs == 6
    assert stage_config("train", parse([*base, "--set", "epochs=7"])).epochs == 7
    assert stage_config("rollout", parse(["rollout", "--config", ""])).max_new_tokens == 11
    monkeypatch.setenv("SR_RAY_TRAIN__EPOCHZ", "1")
    with pytest.raises(ConfigError, match=r"unknown keys \['epochz'\]"):
        stage_config("train", parse(base))


def test_presets_reach_the_stages_that_have_the_field():
    from sr_ray.eval.cli import evaluate_config

    cfg = evaluate_config(parse(["evaluate", "--preset", "llava-1.5-7b", "--bundle", "b"]))
    assert cfg.model == "llava-hf/llava-1.5-7b-hf"
    with pytest.raises(ConfigError, match="preset 'nope': no such file"):
        evaluate_config(parse(["evaluate", "--preset", "nope"]))


def restated(values: dict, default, where: str = "") -> list[str]:
    """Keys of `values` (a YAML mapping) whose value equals the default's, nested sections included."""
    found = []
    for key, value in values.items():
        current = getattr(default, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            found += restated(value, current, f"{where}{key}.")
        elif getattr(build(type(default), {**REQUIRED.get(type(default), {}), key: value}), key) == current:
            found.append(where + key)
    return found


@pytest.mark.parametrize("name, cls", list(STAGE_FILES.items()))
def test_yaml_files_hold_only_what_differs_from_the_defaults(name, cls):
    values = yaml.safe_load((REPO_ROOT / "configs" / name).read_text()) or {}
    default = load(cls, overrides=REQUIRED.get(cls))
    assert restated(values, default) == [], f"configs/{name} restates defaults"
    load(cls, REPO_ROOT / "configs" / name, overrides=REQUIRED.get(cls))  # and it loads


def test_flags_define_no_defaults_of_their_own():
    parser = cli.build_parser()
    parsers = [parser]
    for p in parsers:  # every (sub)command, breadth first
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
            elif action.dest.startswith(_FLAG):
                assert action.default is None, (p.prog, action.dest)
    sugar = [a.dest for p in parsers for a in p._actions if a.dest.startswith(_FLAG)]
    assert len(sugar) > 40 and {"config:awareness.limit", "config:guard.enabled", "config:pgd.steps"} <= set(sugar)


@pytest.mark.parametrize("argv, message", [
    (["preprocess", "--set", "max_side=big"], "max_side: expected int, got 'big'"),
    (["align", "--set", "lr=fast"], "lr: expected float, got 'fast'"),
    (["align", "--epochs", "2", "--set", "rank=[1]"], "rank: expected int"),
    (["rollout", "--set", "max_new_tokens=many"], "max_new_tokens: expected int, got 'many'"),
    (["fit-probe", "--set", "feature=middle"], "feature: expected one of ['prompt_end', 'soft_token']"),
    (["train", "--set", "lr=abc"], "lr: expected float, got 'abc'"),
    (["evaluate", "--set", "awareness.limit=many"], "awareness.limit: expected int, got 'many'"),
    (["evaluate", "--set", "awareness.limt=3"], "unknown keys ['awareness.limt']; valid keys of awareness"),
    (["attack", "pgd", "--set", "pgd.steps=lots"], "pgd.steps: expected int, got 'lots'"),
    (["serve", "--set", "limits.max_tokens=big"], "limits.max_tokens: expected int, got 'big'"),
    (["demo", "--set", "train.epochs=ten"], "train.epochs: expected int, got 'ten'"),
    (["demo", "--set", "evaluate.limt=3"], "unknown keys ['evaluate.limt']"),
    (["train", "--preset", "nope"], "preset 'nope': no such file"),
])
def test_type_errors_exit_2_before_anything_starts(argv, message, capsys, monkeypatch, tmp_path):
    import mlflow
    import ray

    import sr_ray.models
    import sr_ray.runtime

    def started(*args, **kwargs):  # Ray may already be up from other tests: watch the starters instead
        raise AssertionError("work started before the config was checked")

    for owner, name in ((sr_ray.runtime, "ensure_ray"), (ray, "init"), (mlflow, "set_tracking_uri"),
                        (sr_ray.models, "load_vlm")):
        monkeypatch.setattr(owner, name, started)
    monkeypatch.chdir(tmp_path)  # nothing lands in the checkout; the default configs still resolve
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err and "Traceback" not in err
