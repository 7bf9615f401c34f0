"""DeepSpeed state restore on a real single-rank ZeRO-1 engine (gloo, CPU): a checkpoint missing its files
must fail loudly instead of resuming from untrained state."""

from __future__ import annotations

import pytest
import torch

from sr_ray.train.deepspeed_setup import deepspeed_config, import_deepspeed, load_engine_state


@pytest.fixture(scope="module")
def engine():
    """One engine for the module: DeepSpeed keeps its process group once initialized."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as env:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1"}.items():
            env.setenv(key, value)
        deepspeed = import_deepspeed(use_gpu=False)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                          config=deepspeed_config(1, 1, zero_stage=1, bf16=False))
        yield engine
        dist.destroy_process_group()


def test_load_engine_state_restores_a_saved_engine(engine, tmp_path):
    saved = engine.module.weight.detach().clone()
    engine.save_checkpoint(str(tmp_path), tag="state")
    with torch.no_grad():
        engine.module.weight.add_(1.0)
    assert load_engine_state(engine, str(tmp_path), "state")
    assert torch.equal(engine.module.weight, saved)


def test_load_engine_state_refuses_checkpoints_missing_their_files(engine, tmp_path):
    assert engine.load_checkpoint(str(tmp_path / "empty")) == (None, None)  # DeepSpeed's own answer: no error
    with pytest.raises(RuntimeError, match=r"empty/state has no module states or ZeRO optimizer shards"):
        load_engine_state(engine, str(tmp_path / "empty"), "state")
    engine.save_checkpoint(str(tmp_path / "partial"), tag="state")
    for shard in (tmp_path / "partial" / "state").glob("*optim_states.pt"):
        shard.unlink()  # DeepSpeed alone would reset the optimizer from the weights and carry on
    with pytest.raises(RuntimeError, match=r"partial/state has no ZeRO optimizer shards"):
        load_engine_state(engine, str(tmp_path / "partial"), "state")
