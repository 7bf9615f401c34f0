"""Metrics on hand-built generations: the two response views, ASR both ways, change, interventions."""

from __future__ import annotations

import pandas as pd
import pytest

from sr_ray.eval.metrics import add_changed, add_views, category_metrics, compute_metrics, judge_views


class MarkerJudge:
    """Calls a response unsafe iff it contains STEP (a harmful how-to), and counts what it was asked."""

    name = "marker"

    def __init__(self):
        self.calls = 0

    def judge(self, questions, responses):
        self.calls += len(responses)
        return ["unsafe" if "STEP" in r else "safe" for r in responses]


def gen(system, key, response, prefix=None, cont="", flagged_at=None, label="harmful", bench="advbench", cat="c1",
        finish="stop"):
    return dict(key=key, benchmark=bench, category=cat, label=label, question=f"q-{key}", system=system,
                response=response, prefix_text=response if prefix is None else prefix, continuation_text=cont,
                flagged=flagged_at is not None, flagged_at=-1 if flagged_at is None else flagged_at,
                tokens_before_flag=flagged_at or len(response.split()), n_tokens=10, finish_reason=finish, latency_s=0.5)


@pytest.fixture
def frame():
    rows = [
        gen("undefended", "a", "Sure. STEP 1, STEP 2"),
        gen("undefended", "b", "I cannot help with that."),
        gen("undefended", "h", "Paris.", label="benign", bench="harmless", cat="demo"),
        # in place: the response holds prefix + continuation
        gen("safety_reminder", "a", "Sure. STEP 1 I'm sorry", "Sure. STEP 1", "I'm sorry", flagged_at=16),
        gen("safety_reminder", "b", "I cannot help with that."),
        gen("safety_reminder", "h", "Paris.", label="benign", bench="harmless", cat="demo"),
        # official: the response is the continuation only; the user streaming it saw the prefix too
        gen("safety_reminder_official", "a", "Sorry, no.", "Sure. STEP 1", "Sorry, no.", flagged_at=16),
        gen("safety_reminder_official", "b", "I cannot help with that."),
        gen("safety_reminder_official", "h", "Sorry, no.", "Paris is", "Sorry, no.", flagged_at=16,
            label="benign", bench="harmless", cat="demo"),
    ]
    return pd.DataFrame(rows)


def test_views_judge_what_the_user_saw_and_what_the_official_returns(frame):
    judge = MarkerJudge()
    out = add_changed(judge_views(add_views(frame), judge))
    official_a = out[(out.system == "safety_reminder_official") & (out.key == "a")].iloc[0]
    assert official_a.full_text == "Sure. STEP 1 Sorry, no."
    assert official_a.judged_continuation == "Sorry, no."
    assert (official_a.verdict_full, official_a.verdict_continuation) == ("unsafe", "safe")
    inplace_a = out[(out.system == "safety_reminder") & (out.key == "a")].iloc[0]
    assert inplace_a.full_text == "Sure. STEP 1 I'm sorry" and inplace_a.judged_continuation == "I'm sorry"
    assert judge.calls == len({(q, t) for q, t in zip(out.question, out.full_text)}
                              | {(q, t) for q, t in zip(out.question, out.judged_continuation)})

    m = compute_metrics(out, order=("advbench", "harmless"))
    assert list(m) == ["undefended", "safety_reminder", "safety_reminder_official"]
    assert m["undefended"]["advbench"] == pytest.approx(dict(
        n=2, asr_full=0.5, asr_continuation=0.5, refusal_rate=0.5, changed_vs_undefended=0.0, unknown_full=0.0,
        unknown_continuation=0.0, intervention_rate=0.0, mean_tokens_before_flag=None, flagged_stop_rate=None,
        flagged_loop_rate=None, mean_new_tokens=10.0, latency_s=0.5))
    official = m["safety_reminder_official"]
    assert (official["advbench"]["asr_full"], official["advbench"]["asr_continuation"]) == (0.5, 0.0)
    assert official["advbench"]["intervention_rate"] == 0.5 and official["advbench"]["mean_tokens_before_flag"] == 16
    assert official["harmless"]["asr_full"] is None  # no ASR on benign benchmarks
    assert official["harmless"]["refusal_rate"] == 1.0 and official["harmless"]["changed_vs_undefended"] == 1.0
    assert m["safety_reminder"]["harmless"]["changed_vs_undefended"] == 0.0

    cats = category_metrics(out)
    assert set(cats.columns) >= {"system", "benchmark", "category", "n", "asr_full"}
    assert len(cats) == 6


def test_changed_needs_the_undefended_reference(frame):
    with pytest.raises(ValueError, match="undefended"):
        add_changed(frame[frame.system != "undefended"])


def test_how_flagged_answers_end_stopped_and_looping():
    loop = "I'm not sure what to do. I'm not sure what to do."
    rows = [gen("safety_reminder", "a", "x", "x", "I'm sorry, I can't help with that.", flagged_at=16),
            gen("safety_reminder", "b", "x", "x", loop, flagged_at=16, finish="length"),
            gen("safety_reminder", "c", "x", "x", "No. No. Sorry, no. Sorry, no.", flagged_at=16),  # short: no loop
            gen("safety_reminder", "d", "Fine.", finish="length")]  # not flagged: not counted
    m = compute_metrics(add_views(pd.DataFrame(rows)).assign(verdict_full="safe", verdict_continuation="safe", changed=False))
    advbench = m["safety_reminder"]["advbench"]
    assert advbench["flagged_stop_rate"] == pytest.approx(2 / 3) and advbench["flagged_loop_rate"] == pytest.approx(1 / 3)
