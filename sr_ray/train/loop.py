"""The SAPT train loop that runs in every Ray Train worker (DeepSpeed engine over the soft prompt only).

Each worker loads the frozen VLM and the frozen probe; the DeepSpeed module is the `SoftPrompt` (k x D),
so ZeRO partitions / all-reduces nothing but those k x D numbers, and the VLM never enters the optimizer.
Every epoch the global batch order is a seeded permutation and every rank takes its slice of each global
batch, so an epoch is the same whatever happened before (resume-exact). After each epoch: validation on
each rank's share of the val split (counts all-reduced), then a checkpoint (DeepSpeed state + the soft
prompt as safetensors + `train_state.json`) reported through `ray.train.report` by every rank.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STATE = "train_state.json"


def _all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        if op == "mean":
            values /= dist.get_world_size()
    return values


def _all_gather(values: list) -> list:
    """Every rank's list, concatenated (the rank's own list when not distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(values)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(values))
    return [v for part in gathered for v in part]


def warm_start(path: str, vlm, k: int):
    """The soft prompt SAPT continues from: `path` is a bundle directory or a soft_prompt artifact directory."""
    from sr_ray.reminder import SoftPrompt

    directory = Path(path) / "soft_prompt" if (Path(path) / "soft_prompt").is_dir() else Path(path)
    prompt = SoftPrompt.load(directory, vlm)  # refuses a prompt made for another base model
    if prompt.k != k:
        raise ValueError(f"init_from {path}: its soft prompt has k={prompt.k}, the config asks for k={k}")
    return prompt


def train_loop(config: dict) -> None:
    import ray.train
    from ray.air.integrations.mlflow import setup_mlflow
    from ray.train.torch import get_device

    from sr_ray.models import load_vlm
    from sr_ray.reminder import HarmProbe, SoftPrompt
    from sr_ray.runtime import quiet_third_party
    from sr_ray.train.config import SaptConfig
    from sr_ray.train.deepspeed_setup import (
        deepspeed_config, gathered_parameter, import_deepspeed, load_engine_state, lr_scheduler,
    )
    from sr_ray.train.sapt import (
        ValCounts, Validator, build_example, calibrated_threshold, example_rng, sapt_loss, weights_sha256,
    )

    quiet_third_party()
    cfg = SaptConfig(**config["sapt"])
    deepspeed = import_deepspeed(cfg.use_gpu)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if cfg.use_gpu else torch.device("cpu")
    vlm = load_vlm(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, device=str(device), **cfg.model_kwargs)
    frozen_sha = weights_sha256(vlm)
    probe = HarmProbe.load(config["probe_dir"], vlm)
    soft_prompt = warm_start(cfg.init_from, vlm, cfg.k) if cfg.init_from else SoftPrompt.from_text(vlm, cfg.init_text, cfg.k)
    optimizer = torch.optim.AdamW(soft_prompt.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    train_rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: r["id"])
    val_rows = sorted(ray.train.get_dataset_shard("val").iter_rows(), key=lambda r: r["id"])[rank::world]
    micro = cfg.batch_size // world
    steps_per_epoch = len(train_rows) // cfg.batch_size
    engine, optimizer, _, _ = deepspeed.initialize(
        model=soft_prompt, optimizer=optimizer, config=deepspeed_config(cfg.batch_size, world, cfg.zero_stage, cfg.bf16),
        lr_scheduler=lr_scheduler(cfg.lr_schedule, cfg.epochs * steps_per_epoch))

    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            load_engine_state(engine, str(Path(ckpt) / "deepspeed"), "state")
            state = json.loads((Path(ckpt) / STATE).read_text())
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]

    os.environ["MLFLOW_RUN_ID"] = config["mlflow_run_id"]  # every attempt logs into the driver's run
    mlflow = setup_mlflow(tracking_uri=config["tracking_uri"], experiment_name=cfg.experiment,
                          run_name=config["run_name"], rank_zero_only=True)

    def current_prompt() -> SoftPrompt:
        return SoftPrompt(gathered_parameter(engine.module.embeddings), vlm.model_id, soft_prompt.init_text).to(device)

    def validate(prompt: SoftPrompt | None) -> dict:
        threshold = cfg.threshold
        if prompt is not None and cfg.calibrate_benign_flag_rate is not None:
            readings = _all_gather(validator.benign_min_readings(prompt))
            threshold = calibrated_threshold(readings, cfg.calibrate_benign_flag_rate, *cfg.threshold_range)
        counts = ValCounts.from_tensor(_all_reduce(validator.run(prompt, threshold).as_tensor()))
        return counts.metrics() | ({"val/threshold": threshold} if prompt is not None else {})

    validator = Validator(vlm, probe, val_rows, seed=cfg.seed, interval=cfg.interval, threshold=cfg.threshold,
                          max_new_tokens=cfg.val_max_new_tokens, batch_size=cfg.val_batch_size,
                          cls_weight=cfg.cls_weight, max_target_tokens=cfg.max_target_tokens,
                          p_empty=cfg.p_empty_prefix, min_chars=cfg.min_prefix_chars)
    baseline = {k.replace("val/", "undefended/"): v for k, v in validate(None).items() if "lm_loss" not in k}
    if start_epoch == 0:  # step 0 of the curves: before any training
        mlflow.log_metrics(baseline | validate(current_prompt()) | {"epochs_completed": 0}, step=0)

    for epoch in range(start_epoch, cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_rows))
        sums = torch.zeros(3, dtype=torch.float64)
        for step in range(steps_per_epoch):
            start = time.perf_counter()
            batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size][rank * micro : (rank + 1) * micro]
            rows = [train_rows[i] for i in batch]
            examples = [build_example(r, example_rng(cfg.seed, epoch, str(r["id"])), cfg.p_empty_prefix,
                                      cfg.min_prefix_chars) for r in rows]
            loss = sapt_loss(vlm, engine(vlm.dtype), probe, examples, cfg.cls_weight, cfg.max_target_tokens)
            engine.backward(loss.total)
            engine.step()
            global_step += 1
            stats = _all_reduce(torch.tensor([loss.lm.item(), loss.cls.item(), loss.total.item()], dtype=torch.float64), "mean")
            sums += stats
            mlflow.log_metrics({
                "train/lm_loss": stats[0].item(), "train/cls_loss": stats[1].item(), "train/total_loss": stats[2].item(),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/samples_per_s": cfg.batch_size / (time.perf_counter() - start),
            }, step=global_step)

        if (epoch + 1) % cfg.val_every == 0 or epoch == cfg.epochs - 1:
            val = validate(current_prompt())
            val["val/score"] = val["val/refusal_rate_harmful"] + val["val/unchanged_rate_benign"]
            # One step axis for the run (optimizer steps, like train/*); `epochs_completed` at the same step
            # says which epoch a validation point closes.
            mlflow.log_metrics(val | {"epochs_completed": epoch + 1}, step=global_step)
        else:  # not validated: never picked as the bundle's epoch
            val = {"val/score": float("nan"), "val/lm_loss": float("nan")}
        means = (sums / max(steps_per_epoch, 1)).tolist()
        metrics = {"epoch": epoch, "global_step": global_step, "attempt_start_epoch": start_epoch,
                   "train/lm_loss": means[0], "train/cls_loss": means[1], "train/total_loss": means[2]}
        metrics |= val | baseline
        if epoch == cfg.epochs - 1:
            final_sha = weights_sha256(vlm)
            if final_sha != frozen_sha:
                raise RuntimeError("the base VLM's weights changed during SAPT; only the soft prompt may train")
            metrics["base_weights_sha256"] = final_sha
        _report(engine, current_prompt(), rank, metrics)


def _report(engine, prompt, rank: int, metrics: dict) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 adds the soft prompt and the loop state."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="sapt-ckpt-") as tmp:
        engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag="state")
        if rank == 0:
            prompt.save(Path(tmp) / "soft_prompt")
            (Path(tmp) / STATE).write_text(json.dumps(
                {"epoch": metrics["epoch"], "global_step": metrics["global_step"]}, indent=2))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    # Reports reach the controller asynchronously: a worker dying right after `report` could lose this
    # checkpoint and restart from an older one. Wait until the controller has registered it.
    ray.train.get_all_reported_checkpoints()
