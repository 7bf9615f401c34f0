"""Soft prompt, probe and bundle artifacts: round trips, base-model binding, and no pickle ever."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from sr_ray.models import load_vlm
from sr_ray.reminder import DEFAULT_INIT_TEXT, ArtifactError, HarmProbe, ReminderBundle, SoftPrompt


@pytest.fixture(scope="module")
def llava():
    return load_vlm("tiny-llava")


def test_soft_prompt_round_trip_and_init_from_text(llava, tmp_path):
    sp = SoftPrompt.from_text(llava, DEFAULT_INIT_TEXT, k=4)
    ids = llava.tokenizer(DEFAULT_INIT_TEXT, add_special_tokens=False).input_ids[:4]
    torch.testing.assert_close(sp.embeddings.data, llava.embed_tokens(torch.tensor(ids)))
    sp.save(tmp_path / "sp")
    meta = json.loads((tmp_path / "sp" / "meta.json").read_text())
    assert meta["base_model_id"] == "tiny-llava" and meta["k"] == 4 and meta["hidden_size"] == 64
    back = SoftPrompt.load(tmp_path / "sp", llava)
    assert torch.equal(back.embeddings, sp.embeddings) and back.init_text == sp.init_text


def test_short_init_text_is_repeated_to_k_tokens(llava):
    sp = SoftPrompt.from_text(llava, "hi", k=6)
    assert sp.embeddings.shape == (6, 64)


def test_artifacts_for_another_base_model_are_rejected(llava, tmp_path):
    qwen = load_vlm("tiny-qwen2-vl")
    SoftPrompt.from_text(qwen).save(tmp_path / "sp")
    HarmProbe(torch.zeros(64), 0.0, base_model_id="tiny-qwen2-vl").save(tmp_path / "probe")
    with pytest.raises(ArtifactError, match="tiny-qwen2-vl.*cannot be used with 'tiny-llava'"):
        SoftPrompt.load(tmp_path / "sp", llava)
    with pytest.raises(ArtifactError, match="cannot be used with"):
        HarmProbe.load(tmp_path / "probe", llava)


def test_pickle_files_are_refused(llava, tmp_path):
    pt = tmp_path / "prompt_embedding_iter_49.pth"
    torch.save({"weight": torch.zeros(4, 64)}, pt)
    with pytest.raises(ArtifactError, match="pickle"):
        SoftPrompt.load(pt, llava)
    raw = tmp_path / "probe.pkl"
    raw.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ArtifactError, match="pickle"):
        HarmProbe.load(raw)
    # a pickle dressed up as the artifact's tensors file is refused too
    SoftPrompt.from_text(llava).save(tmp_path / "sp")
    (tmp_path / "sp" / "tensors.safetensors").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ArtifactError, match="pickle"):
        SoftPrompt.load(tmp_path / "sp", llava)


def test_tampered_tensors_fail_the_checksum(llava, tmp_path):
    from safetensors.torch import save_file

    SoftPrompt.from_text(llava).save(tmp_path / "sp")
    save_file({"embeddings": torch.ones(4, 64)}, tmp_path / "sp" / "tensors.safetensors")
    with pytest.raises(ArtifactError, match="checksum"):
        SoftPrompt.load(tmp_path / "sp", llava)


def test_probe_fit_folds_the_official_pca_lr_pipeline_into_one_vector():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    direction = rng.normal(size=32)
    x = rng.normal(size=(200, 32)) + np.outer(rng.integers(0, 2, 200) * 2 - 1, direction)
    safe = (x @ direction > 0).astype(int)
    probe = HarmProbe.fit(x, safe, base_model_id="m")
    pca = PCA(n_components=20, random_state=0).fit(x)
    ref = LogisticRegression().fit(pca.transform(x)[:, :4], safe).predict_proba(pca.transform(x)[:, :4])[:, 1]
    ours = probe.p_safe(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert ((ours > 0.5) == safe).mean() > 0.9


def test_bundle_round_trip_pins_its_parts(llava, tmp_path):
    bundle = ReminderBundle(SoftPrompt.from_text(llava), HarmProbe(torch.randn(64), 0.3, 0.2, "tiny-llava"),
                            "tiny-llava", interval=8, threshold=0.25, data_checksum="abc")
    bundle.save(tmp_path / "b")
    back = ReminderBundle.load(tmp_path / "b", llava)
    assert back.interval == 8 and back.threshold == 0.25 and back.data_checksum == "abc"
    assert torch.equal(back.probe.weight, bundle.probe.weight)
    assert back.guard_config().interval == 8
    HarmProbe(torch.randn(64), 0.1, 0.2, "tiny-llava").save(tmp_path / "b" / "probe")  # swap a part
    with pytest.raises(ArtifactError, match="pinned checksum"):
        ReminderBundle.load(tmp_path / "b", llava)
