"""`sr-ray rollout`, `sr-ray fit-probe`, `sr-ray train`: YAML config < --preset < flags < --set a.b=value."""

from __future__ import annotations

import argparse
import json

from sr_ray.config import add_arguments, flag, from_args

STAGES = {
    # command: (config class name, preset section, default config file, help)
    "rollout": ("RolloutConfig", "rollout", "configs/rollout.yaml", "on-policy rollouts of the base VLM -> preference rows"),
    "fit-probe": ("ProbeFitConfig", "fit_probe", "configs/fit_probe.yaml", "fit the harm probe (PCA-20 -> 4 -> LR), val AUC + ROC"),
    "train": ("SaptConfig", "train", "configs/train_sapt.yaml", "SAPT on Ray Train + DeepSpeed -> registered reminder bundle"),
}


def stage_config(command: str, args: argparse.Namespace):
    """The stage's dataclass config from the parsed arguments."""
    from sr_ray.train import config as config_module

    cls_name, section, _, _ = STAGES[command]
    return from_args(getattr(config_module, cls_name), args, section)


def cmd_rollout(args: argparse.Namespace) -> int:
    from sr_ray.train import run_rollout

    out = run_rollout(stage_config("rollout", args))
    print(json.dumps({"rollout": str(out), **json.loads(out.with_suffix(".summary.json").read_text())}, indent=2))
    return 0


def cmd_fit_probe(args: argparse.Namespace) -> int:
    from sr_ray.train import run_fit_probe

    probe_dir, metrics = run_fit_probe(stage_config("fit-probe", args))
    print(json.dumps({"probe": str(probe_dir), **metrics}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sr_ray.train import run_sapt

    cfg = stage_config("train", args)
    bundle_dir, run_id, version = run_sapt(cfg)
    summary = json.loads((bundle_dir.parent / "summary.json").read_text())
    final = {k: v for k, v in summary["final"].items() if k.startswith(("val/", "undefended/", "train/"))}
    print(json.dumps({"bundle": str(bundle_dir), "mlflow_run_id": run_id,
                      "model_uri": f"models:/{cfg.registered_model}/{version}", "final": final}, indent=2))
    return 0


def add_stage_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of one stage (shared by `sr-ray <command>` and `pipelines/*.py`)."""
    _, section, default_config, _ = STAGES[command]
    add_arguments(p, default_config, section)
    flag(p, "--model", help="VLM: tiny-llava | tiny-qwen2-vl | smol-llava | hub id | local dir")
    flag(p, "--work-dir", help="outputs and the default MLflow store (sqlite:///<work-dir>/mlflow.db)")
    flag(p, "--tracking-uri", help="any MLflow tracking URI (default: the sqlite store in --work-dir)")
    if command == "train":
        flag(p, "--num-workers", type=int, help="Ray Train workers")
        flag(p, "--epochs", type=int)
        flag(p, "--run-name", help="reuse a previous run's name to resume it from its last checkpoint")
    else:
        flag(p, "--data-dir", help="preprocessed data (sr-ray preprocess --out)")


COMMANDS = {"rollout": cmd_rollout, "fit-probe": cmd_fit_probe, "train": cmd_train}
PIPELINE_SCRIPTS = {"rollout": "rollout.py", "fit-probe": "fit_probe.py", "train": "train_sapt.py"}


def pipeline_main(command: str, argv: list[str] | None = None) -> int:
    """Entry of `pipelines/<stage>.py` (a `ray job submit` entrypoint): the same flags as the subcommand."""
    from sr_ray.cli import pipeline_main as run

    return run(PIPELINE_SCRIPTS[command], STAGES[command][3], lambda p: add_stage_arguments(p, command),
               COMMANDS[command], argv)


def cmd_align(args: argparse.Namespace) -> int:
    from sr_ray.train.align import AlignConfig, run_align

    print(run_align(from_args(AlignConfig, args, "align")))
    return 0


def cmd_calibrate_blind(args: argparse.Namespace) -> int:
    from sr_ray.train.blind import BlindConfig, run_calibrate_blind

    print(json.dumps(run_calibrate_blind(from_args(BlindConfig, args, "calibrate_blind")), indent=2))
    return 0


def add_commands(sub, bench) -> None:
    for command, (_, _, _, help_text) in STAGES.items():
        p = sub.add_parser(command, help=help_text)
        add_stage_arguments(p, command)
        p.set_defaults(func=COMMANDS[command])
    p = sub.add_parser("align", help="rebuild the embedded default's safety alignment (seeded LoRA SFT, PEFT)")
    add_arguments(p, None, "align")
    flag(p, "--data-dir", help="raw data laid out like shared/data (needs refusal_direction/splits)")
    flag(p, "--out", help="adapter directory (default: the shipped one's)")
    flag(p, "--epochs", type=int)
    flag(p, "--harmless", type=int, help="harmless_train instructions answered by the model itself")
    flag(p, "--seed", type=int)
    p.set_defaults(func=cmd_align)
    p = sub.add_parser("calibrate-blind", help="add the image-blind check to a bundle (threshold from benign val answers)")
    add_arguments(p, None, "calibrate_blind")
    flag(p, "--bundle", help="the reminder bundle directory")
    flag(p, "--processed-dir", help="`sr-ray preprocess` output (only its val splits are read)")
    flag(p, "--out", help="the new bundle directory")
    flag(p, "--model")
    flag(p, "--benign", type=int, help="benign val answers to calibrate on (64)")
    flag(p, "--harmful", type=int, help="jailbroken harmful val answers to measure the flag rate on (48)")
    p.set_defaults(func=cmd_calibrate_blind)
