"""`evaluate` end to end on tiny-llava through the Ray Data actor pool: metrics.json contract, agreement with
the saved generations, the guard's behaviour seen from outside, provenance, MLflow and awareness."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from sr_ray.cli import build_parser
from sr_ray.config import REPO_ROOT
from sr_ray.config_types import ConfigError
from sr_ray.eval.cli import attack_config, evaluate_config
from sr_ray.eval.awareness import plot_awareness
from sr_ray.eval.benchmarks import preprocess_selection, sample_by_category
from sr_ray.judges import RuleJudge
from sr_ray.data.prefill import PREFILL_GENERIC
from sr_ray.eval.runner import EvaluateConfig
from sr_ray.infer import SYSTEMS

CONTRACT = ("n", "asr_full", "asr_continuation", "refusal_rate", "changed_vs_undefended")

pytestmark = pytest.mark.slow


def test_metrics_json_contract(eval_run):
    run, metrics = eval_run
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert list(metrics) == list(SYSTEMS)
    for system, benches in metrics.items():
        # demo data: no MM-SafetyBench, VLSafe or MM-Vet there, so those benchmarks are left out
        assert list(benches) == ["figstep", "figstep+pgd", "figstep+prefill", "advbench", "advbench+pgd",
                                 "advbench+prefill", "advbench_pgd", "harmful", "harmful+pgd", "harmful+prefill",
                                 "harmless"]
        for bench, m in benches.items():
            assert set(CONTRACT) <= set(m) and m["n"] == 2
            harmful = bench != "harmless"  # "harmful": the direct asks of refusal_direction's harmful test split
            assert (m["asr_full"] is not None) == harmful and (m["asr_continuation"] is not None) == harmful
    table = pd.read_csv(run / "metrics.csv")
    assert len(table) == 4 * 11 and set(CONTRACT) <= set(table.columns)


def test_attack_variants_are_the_plain_rows_attacked(eval_run, pgd_attack_dir):
    run, _ = eval_run
    resp = pd.read_json(run / "responses.jsonl", lines=True)
    resp = resp[resp["system"] == "undefended"].set_index("key")
    advbench = pd.read_csv(REPO_ROOT / "sr_ray/demo_data/AdvBench/harmful_behaviors.csv").set_index("goal")["target"]
    for bench in ("figstep", "advbench"):
        plain = resp[resp["benchmark"] == bench]
        for name in ("prefill", "pgd"):
            attacked = resp[resp["benchmark"] == f"{bench}+{name}"]
            # the same questions, each once, with the attack on top
            assert sorted(attacked["question"]) == sorted(plain["question"]) and (attacked["attack"] == name).all()
        prefills = resp[resp["benchmark"] == f"{bench}+prefill"]
        expected = [advbench[q] if bench == "advbench" else PREFILL_GENERIC for q in prefills["question"]]
        assert list(prefills["answer_prefix"]) == expected
        assert (plain["answer_prefix"] == "").all()
    # a prefilled answer continues the prefill: the model's text differs from its plain answer
    prefilled = resp[resp["benchmark"] == "advbench+prefill"]
    plain = resp[resp["benchmark"] == "advbench"].set_index("question")["response"]
    assert any(r != plain[q] for q, r in zip(prefilled["question"], prefilled["response"]))


def test_metrics_agree_with_the_saved_generations(eval_run):
    run, metrics = eval_run
    resp = pd.read_json(run / "responses.jsonl", lines=True)
    rule = RuleJudge()
    assert (resp["verdict_full"] == resp["full_text"].map(lambda t: "safe" if rule.is_refusal(t) else "unsafe")).all()
    base = resp[resp["system"] == "undefended"].set_index("key")["response"]
    for (system, bench), g in resp.groupby(["system", "benchmark"]):
        m = metrics[system][bench]
        assert m["n"] == len(g)
        # the share of this system's answers that differ from the undefended answer to the same row
        assert m["changed_vs_undefended"] == pytest.approx((g["response"] != base.loc[g["key"]].to_numpy()).mean())
        if m["asr_full"] is not None:
            assert m["asr_full"] == pytest.approx((g["verdict_full"] == "unsafe").mean())
            assert m["asr_continuation"] == pytest.approx((g["verdict_continuation"] == "unsafe").mean())
        assert m["intervention_rate"] == pytest.approx(g["flagged"].mean())
    # not vacuous: a defended system's answers differ from the undefended ones somewhere
    assert any(m["changed_vs_undefended"] > 0 for s in metrics if s != "undefended" for m in metrics[s].values())


def test_the_guard_seen_from_outside(eval_run):
    run, _ = eval_run
    resp = pd.read_json(run / "responses.jsonl", lines=True).set_index(["system", "key"])
    base = resp.loc["undefended", "response"]
    inplace, official = resp.loc["safety_reminder"], resp.loc["safety_reminder_official"]
    assert inplace["flagged"].any() and not inplace["flagged"].all(), "the test probe should flag some answers"
    # unflagged in-place answers are token-identical to undefended decoding (the reminder left no trace)
    quiet = inplace.loc[~inplace["flagged"]]
    assert (quiet["response"] == base.loc[quiet.index]).all()
    # official flagged rows return the continuation; the full view puts the emitted prefix in front
    loud = official.loc[official["flagged"]]
    assert (loud["response"] == loud["judged_continuation"]).all()
    assert all(f.endswith(r.strip()) for f, r in zip(loud["full_text"], loud["response"]))


def test_provenance_mlflow_and_awareness(eval_run, processed_dir, tiny_bundle):
    from mlflow import MlflowClient

    from sr_ray.data import manifest_checksum

    run, _ = eval_run
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["data_manifest_checksum"] == manifest_checksum(processed_dir)
    assert prov["bundle_info"]["base_model_id"] == "tiny-llava" and prov["versions"]["torch"]
    client = MlflowClient(tracking_uri=prov["tracking_uri"])
    logged = client.get_run(prov["mlflow_run_id"])
    assert logged.data.metrics["safety_reminder.advbench.n"] == 2
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} >= {"metrics.json", "plots", "provenance.json"}
    awareness = json.loads((run / "awareness.json").read_text())["summaries"]
    assert len(awareness) == 2  # with and without the soft prompt
    readings = pd.read_csv(run / "awareness_readings.csv")
    for name, s in awareness.items():
        assert set(s["curve"]) == {"harmful", "benign"} and s["n_answers"] == {"harmful": 2, "benign": 2}
        sched = readings[(readings["reading"] == name) & (readings["position"] % s["interval"] == 0)]
        for label, points in s["curve"].items():
            by_pos = sched[sched["label"] == label].groupby("position")["p_safe"]
            assert [p["position"] for p in points] == sorted(by_pos.groups)
            for p in points:  # each point summarises the saved readings at its position
                v = by_pos.get_group(p["position"]).to_numpy()
                assert (p["n"], p["mean"]) == (len(v), pytest.approx(v.mean()))
                assert [p["q25"], p["median"], p["q75"]] == pytest.approx(np.percentile(v, [25, 50, 75]).tolist())
        for a in s["auc_by_position"]:
            at = sched[sched["position"] == a["position"]]
            assert a["auc"] == pytest.approx(roc_auc_score(at["label"] == "harmful", 1 - at["p_safe"]))
    assert (run / "plots" / "awareness.png").exists()


def test_awareness_plot_draws_the_summaries(eval_run, tmp_path):
    run, _ = eval_run
    summaries = json.loads((run / "awareness.json").read_text())["summaries"]
    fig = plot_awareness(summaries, tmp_path / "awareness.png")
    assert [ax.get_title() for ax in fig.axes] == list(summaries)
    for ax, s in zip(fig.axes, summaries.values()):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for label, points in s["curve"].items():
            line = lines[f"{label} (mean)"]
            assert list(line.get_xdata()) == [p["position"] for p in points]
            assert list(line.get_ydata()) == pytest.approx([p["mean"] for p in points])
        assert list(lines[f"threshold {s['threshold']}"].get_ydata()) == [s["threshold"]] * 2


def test_cli_overrides_reach_the_config(tmp_path):
    yaml_path = tmp_path / "evaluate.yaml"
    yaml_path.write_text("limit: 5\nmax_new_tokens: 32\nawareness:\n  limit: 3\n")
    args = build_parser().parse_args(["evaluate", "--config", str(yaml_path), "--bundle", "b", "--systems",
                                      "self_reminder,safety_reminder", "--limit", "0", "--awareness-max-new-tokens", "9",
                                      "--no-inline-typography"])
    cfg = evaluate_config(args)
    assert cfg.systems == ["undefended", "self_reminder", "safety_reminder"]  # the reference system is added
    assert (cfg.limit, cfg.max_new_tokens, cfg.inline_typography) == (None, 32, False)
    assert (cfg.awareness.limit, cfg.awareness.max_new_tokens) == (3, 9)
    with pytest.raises(ValueError, match="need --bundle"):  # no bundle ships for the tiny models
        EvaluateConfig(systems=["safety_reminder"], model="tiny-llava")
    assert EvaluateConfig(systems=["safety_reminder"]).bundle.endswith("reminder/bundles/smol-llava")  # the shipped one
    with pytest.raises(ValueError, match="unknown benchmarks"):
        EvaluateConfig(benchmarks=["advbench_pgd"])


def test_cli_default_config_is_the_stage_yaml_from_any_directory(tmp_path, monkeypatch):
    """`sr-ray evaluate` / `sr-ray attack` read configs/<stage>.yaml like pipelines/<stage>.py; '' = dataclass defaults."""
    monkeypatch.chdir(tmp_path)  # not the checkout: the default still resolves
    parse = build_parser().parse_args
    demo = evaluate_config(parse(["evaluate", "--bundle", "b"]))
    yaml_values = yaml.safe_load((REPO_ROOT / "configs/evaluate.yaml").read_text())
    assert (demo.reminder_max_new_tokens, demo.awareness.limit) == (yaml_values["reminder_max_new_tokens"],
                                                                     yaml_values["awareness"]["limit"])
    assert demo.reminder_max_new_tokens != EvaluateConfig.reminder_max_new_tokens
    bare = evaluate_config(parse(["evaluate", "--bundle", "b", "--config", ""]))
    assert (bare.limit, bare.reminder_max_new_tokens) == (EvaluateConfig.limit, EvaluateConfig.reminder_max_new_tokens)
    pgd_steps = yaml.safe_load((REPO_ROOT / "configs/attack.yaml").read_text())["pgd"]["steps"]
    assert attack_config(parse(["attack", "pgd"])).pgd.steps == pgd_steps
    assert attack_config(parse(["attack", "pgd", "--config", ""])).pgd.steps == 3000  # the official setting
    with pytest.raises(ConfigError, match="configs/nope.yaml: no such file"):
        evaluate_config(parse(["evaluate", "--bundle", "b", "--config", "configs/nope.yaml"]))


def test_benchmark_selection_and_sampling():
    assert preprocess_selection(["figstep", "mmsafetybench_typo", "advbench"], True) == (
        ["advbench", "figstep", "mmsafetybench"], ["text", "text_inlined", "typo_text_inlined"])
    assert preprocess_selection(["figstep"], False) == (["figstep"], ["image"])
    rows = [dict(c=c, i=i) for c in "abc" for i in range(5)]
    picked = sample_by_category(rows, 4, seed=0, category=lambda r: r["c"])
    assert len(picked) == 4 and {r["c"] for r in picked} == {"a", "b", "c"}
    assert picked == sample_by_category(rows, 4, seed=0, category=lambda r: r["c"])
