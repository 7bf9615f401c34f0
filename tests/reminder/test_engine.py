"""GuardedGenerator against independent references, on tiny LLaVA and tiny Qwen2-VL, batch 1 and 3."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sr_ray.models import Prompt
from sr_ray.reminder import GuardConfig, GuardedGenerator, HarmProbe, SamplingConfig, SoftPrompt

from .reference import full_hidden, greedy_after

N_NEW = 24
INTERVAL = 8


def prompts(batch: int) -> list[Prompt]:
    rows = [
        Prompt("What is shown in this picture?", Image.new("RGB", (48, 40), (200, 30, 30))),
        Prompt("hi"),
        Prompt("Tell me a long story about a cat, a dog and a red chair, please."),
    ]
    return rows[:batch]


class ScriptedProbe(HarmProbe):
    """P(safe) = 0 for `rows` at the `at`-th check call (1-based), else 1; records every checked hidden."""

    def __init__(self, hidden_size: int, at: int | None = None, rows: tuple[int, ...] = (0, 1, 2)):
        super().__init__(torch.zeros(hidden_size), 0.0)
        self.at, self.rows, self.calls, self.seen = at, rows, 0, []

    def p_safe(self, hidden):
        self.calls += 1
        self.seen.append(hidden.clone())
        p = torch.ones(hidden.shape[0])
        if self.calls == self.at:
            p[[r for r in self.rows if r < len(p)]] = 0.0
        return p


def hf_greedy(vlm, batch_prompts, n=N_NEW) -> list[list[int]]:
    b = vlm.encode(batch_prompts)
    out = vlm.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, **b.vision,
                             max_new_tokens=n, do_sample=False)
    rows = []
    for r in out[:, b.input_ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(r) if t in vlm.eos_token_ids), len(r))
        rows.append(r[:cut])
    return rows


def run(vlm, batch_prompts, probe, **guard):
    gen = GuardedGenerator(vlm, SoftPrompt.from_text(vlm), probe, GuardConfig(interval=INTERVAL, **guard))
    return gen.generate(batch_prompts, SamplingConfig(max_new_tokens=N_NEW))


@pytest.mark.parametrize("batch", [1, 3])
def test_never_flagging_probe_is_token_identical_to_generate(tiny_vlm, batch):
    ps = prompts(batch)
    probe = ScriptedProbe(tiny_vlm.hidden_size)
    outs = run(tiny_vlm, ps, probe)
    assert [o.prefix_ids for o in outs] == hf_greedy(tiny_vlm, ps)
    assert all(not o.flagged and o.continuation_ids == [] for o in outs)
    assert [c.position for c in outs[0].checks] == [8, 16, 24]  # every interval; the end is covered by 24
    assert probe.calls == 3


@pytest.mark.parametrize("batch", [1, 3])
def test_incremental_check_reads_the_full_forward_hidden_state(tiny_vlm, batch):
    ps = prompts(batch)
    probe = ScriptedProbe(tiny_vlm.hidden_size)
    soft = SoftPrompt.from_text(tiny_vlm)
    outs = GuardedGenerator(tiny_vlm, soft, probe, GuardConfig(interval=INTERVAL)).generate(
        ps, SamplingConfig(max_new_tokens=N_NEW))
    for call, position in enumerate([8, 16, 24]):
        for row, p in enumerate(ps):
            ref = full_hidden(tiny_vlm, p, outs[row].prefix_ids[:position], soft())[-1]
            # fp32; cached vs uncached attention differ only by summation order
            torch.testing.assert_close(probe.seen[call][row], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_flag_continues_in_place_like_greedy_from_prompt_prefix_soft(tiny_vlm, batch):
    ps = prompts(batch)
    soft = SoftPrompt.from_text(tiny_vlm)
    gen = GuardedGenerator(tiny_vlm, soft, ScriptedProbe(tiny_vlm.hidden_size, at=2),
                           GuardConfig(interval=INTERVAL, reminder_max_new_tokens=10))
    outs = gen.generate(ps, SamplingConfig(max_new_tokens=N_NEW))
    plain = hf_greedy(tiny_vlm, ps)
    for row, (p, o) in enumerate(zip(ps, outs)):
        assert o.flagged_at == 16 and o.prefix_ids == plain[row][:16]
        assert o.extra_prefill_tokens == 0
        assert o.continuation_ids == greedy_after(tiny_vlm, p, o.prefix_ids, soft(), 10)


def test_a_flagged_row_leaves_the_other_rows_untouched(tiny_vlm):
    ps = prompts(3)
    outs = run(tiny_vlm, ps, ScriptedProbe(tiny_vlm.hidden_size, at=1, rows=(1,)), reminder_max_new_tokens=12)
    plain = hf_greedy(tiny_vlm, ps)
    assert outs[1].flagged_at == 8 and not outs[0].flagged and not outs[2].flagged
    assert outs[0].prefix_ids == plain[0] and outs[2].prefix_ids == plain[2]
    # the flagged row's continuation in the mixed batch is the one it gets alone, and the no-cache reference
    solo = run(tiny_vlm, [ps[1]], ScriptedProbe(tiny_vlm.hidden_size, at=1, rows=(0,)), reminder_max_new_tokens=12)[0]
    assert (outs[1].prefix_ids, outs[1].continuation_ids) == (solo.prefix_ids, solo.continuation_ids)
    assert len(outs[1].continuation_ids) == 12
    soft = SoftPrompt.from_text(tiny_vlm)
    assert outs[1].continuation_ids == greedy_after(tiny_vlm, ps[1], outs[1].prefix_ids, soft(), 12)


def test_short_answers_are_checked_at_eos(tiny_vlm):
    ps = prompts(1)
    plain = hf_greedy(tiny_vlm, ps)[0]
    n = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
    eos = plain[n]  # make this greedy token end the answer: an n-token answer, shorter than the interval
    tiny_vlm.eos_token_ids.add(eos)
    try:
        outs = run(tiny_vlm, ps, ScriptedProbe(tiny_vlm.hidden_size))
        gaps = run(tiny_vlm, ps, ScriptedProbe(tiny_vlm.hidden_size), check_at_end=False)
        soft = SoftPrompt.from_text(tiny_vlm)
        flagged = run(tiny_vlm, ps, ScriptedProbe(tiny_vlm.hidden_size, at=1), reminder_max_new_tokens=4)
        expected = greedy_after(tiny_vlm, ps[0], plain[:n], soft(), 4)
    finally:
        tiny_vlm.eos_token_ids.discard(eos)
    assert n < INTERVAL
    assert outs[0].prefix_ids == plain[:n] and [c.position for c in outs[0].checks] == [n]
    assert outs[0].finish_reason == "stop"
    assert gaps[0].checks == []  # the official coverage gap, reproduced when asked for
    assert flagged[0].flagged_at == n and flagged[0].prefix_ids == plain[:n]
    assert flagged[0].continuation_ids == expected


def test_official_mode_reprefills_prompt_prefix_soft_and_returns_the_continuation(tiny_vlm):
    ps = prompts(1)
    soft = SoftPrompt.from_text(tiny_vlm)
    gen = GuardedGenerator(tiny_vlm, soft, ScriptedProbe(tiny_vlm.hidden_size, at=1),
                           GuardConfig(interval=INTERVAL, mode="official", schedule="official",
                                       check_at_end=False, reminder_max_new_tokens=6))
    out = gen.generate(ps, SamplingConfig(max_new_tokens=N_NEW))[0]
    plain = hf_greedy(tiny_vlm, ps)[0]
    # checked before the 8th token's step (count % 8 == 7); the flagged row still gets that token
    assert [c.position for c in out.checks] == [7] and out.flagged_at == 8
    assert out.prefix_ids == plain[:8] and out.text == out.continuation_text
    assert out.extra_prefill_tokens > 8
    # the re-prefill goes through text: the decoded prefix is re-tokenized, as the official does
    retok = tiny_vlm.tokenizer(out.prefix_text, add_special_tokens=False).input_ids
    prompt_with_prefix = Prompt(ps[0].text, ps[0].image, answer_prefix=out.prefix_text)
    expected = greedy_after(tiny_vlm, prompt_with_prefix, [], soft(), 6)
    assert out.continuation_ids == expected, retok


def test_official_mode_in_a_batch_gives_each_row_its_solo_output(tiny_vlm):
    """Rows 0 and 2 flagged at the first check, row 1 never: the second pass re-prefills only the flagged rows
    (as one left-padded batch) and every row comes back as it does alone."""
    ps = prompts(3)
    guard = GuardConfig(interval=INTERVAL, mode="official", schedule="official", check_at_end=False,
                        reminder_max_new_tokens=6)
    soft = SoftPrompt.from_text(tiny_vlm)
    batched = GuardedGenerator(tiny_vlm, soft, ScriptedProbe(tiny_vlm.hidden_size, at=1, rows=(0, 2)), guard).generate(
        ps, SamplingConfig(max_new_tokens=N_NEW))
    for row, out in enumerate(batched):
        probe = ScriptedProbe(tiny_vlm.hidden_size, at=1, rows=(0,) if row != 1 else ())
        solo = GuardedGenerator(tiny_vlm, soft, probe, guard).generate([ps[row]], SamplingConfig(max_new_tokens=N_NEW))[0]
        assert (out.text, out.prefix_ids, out.continuation_ids) == (solo.text, solo.prefix_ids, solo.continuation_ids)
        assert (out.flagged_at, out.finish_reason, out.extra_prefill_tokens) == \
               (solo.flagged_at, solo.finish_reason, solo.extra_prefill_tokens)
    assert [o.flagged_at for o in batched] == [8, None, 8] and batched[1].continuation_ids == []
    assert batched[1].prefix_ids == hf_greedy(tiny_vlm, ps)[1]
    assert all(batched[r].continuation_ids and batched[r].text == batched[r].continuation_text for r in (0, 2))


def test_sampling_is_reproducible_with_a_seed(tiny_vlm):
    gen = GuardedGenerator(tiny_vlm)
    cfg = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9, seed=7)
    a = gen.generate(prompts(3), cfg, guard=False)
    b = gen.generate(prompts(3), cfg, guard=False)
    other = gen.generate(prompts(3), SamplingConfig(max_new_tokens=12, do_sample=True, seed=8), guard=False)
    assert [o.prefix_ids for o in a] == [o.prefix_ids for o in b]
    assert [o.prefix_ids for o in a] != [o.prefix_ids for o in other]


def test_unseeded_sampling_leaves_the_global_rng_alone(tiny_vlm):
    gen = GuardedGenerator(tiny_vlm)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    gen.generate(prompts(2), SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.0), guard=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's seeded stream is not reseeded


def test_guard_without_artifacts_is_refused(tiny_vlm):
    with pytest.raises(ValueError, match="soft prompt and a probe"):
        GuardedGenerator(tiny_vlm).generate(prompts(1))


def _repeats(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i: i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_bans_only_the_continuations_repeats(tiny_vlm):
    """`reminder_no_repeat_ngram`: after a flag the continuation never repeats an n-gram of itself; up to its
    first would-be repeat it is the plain continuation, and the answer before the flag and unflagged rows stay."""
    ps, n = prompts(3), 2
    loose = run(tiny_vlm, ps, ScriptedProbe(tiny_vlm.hidden_size, at=1, rows=(0, 2)), reminder_max_new_tokens=20)
    banned = run(tiny_vlm, ps, ScriptedProbe(tiny_vlm.hidden_size, at=1, rows=(0, 2)), reminder_max_new_tokens=20,
                 reminder_no_repeat_ngram=n)
    assert any(_repeats(loose[r].continuation_ids, n) for r in (0, 2))  # a random tiny model loops
    for r in (0, 2):
        a, b = loose[r].continuation_ids, banned[r].continuation_ids
        assert banned[r].flagged_at == 8 and banned[r].prefix_ids == loose[r].prefix_ids
        assert b and not _repeats(b, n)
        first = next((i for i in range(n, len(a) + 1) if _repeats(a[:i], n)), len(a) + 1) - 1
        assert b[:first] == a[:first]
    assert (banned[1].prefix_ids, banned[1].continuation_ids) == (loose[1].prefix_ids, []) and not banned[1].flagged
