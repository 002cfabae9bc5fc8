"""The degeneration detector and the report's statistics: pure functions on hand-made ids and scores."""

from __future__ import annotations

import math

import pytest
import torch

from eval.stats import combine_equal_weight, grouped_estimate, grouped_paired_difference, mean_estimate
from pipeline.degeneration import (
    OutputSignals,
    degeneration_verdict,
    output_signals,
    seq_rep_n,
    tail_loop,
)
from pipeline.probing import NonFiniteRecorder

EOS = 2
# 40 distinct ids standing in for prose: no token or phrase repeats.
PROSE = list(range(100, 140))


def signals(ids, **kwargs) -> OutputSignals:
    return output_signals(ids, eos_token_ids=[EOS], **kwargs)


def test_single_token_loop_is_flagged_with_the_repeated_token():
    out = signals([7] * 48, token_text=lambda t: f"<{t}>")
    assert out.failure == "single-token loop"
    assert (out.longest_run, out.run_token_id, out.run_token_text) == (48, 7, "<7>")
    assert out.tail_loop_period == 1 and out.tail_loop_share == 1.0
    assert out.distinct_window == 1 / 32
    assert not out.eos_reached


def test_phrase_loop_is_flagged_with_its_period():
    phrase = [11, 12, 13, 14, 15]
    out = signals(phrase * 10)
    assert out.failure == "phrase loop"
    assert out.longest_run == 1
    assert out.tail_loop_period == 5 and out.tail_loop_share == 1.0
    assert out.seq_rep_4 == pytest.approx(1 - 5 / 47)


def test_prose_then_a_loop_reports_the_loop_share_of_the_tail():
    ids = PROSE[:20] + [21, 22, 23] * 10
    out = signals(ids)
    assert out.failure == "phrase loop"
    assert out.tail_loop_period == 3
    assert out.tail_loop_share == pytest.approx(30 / 50)
    assert tail_loop(PROSE[:40] + [21, 22, 23] * 3) == (3, pytest.approx(9 / 49))  # present but too short


def test_clean_prose_is_not_flagged_and_eos_cuts_the_padding():
    out = signals([*PROSE, EOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS], text="A clean sentence about rivers.")
    assert out.failure is None
    assert out.eos_reached and out.n_tokens == len(PROSE)
    assert out.longest_run == 1 and out.seq_rep_4 == 0.0 and out.tail_loop_period == 0
    assert out.zlib_ratio < 2.4


def test_nan_logits_are_degenerate_even_when_the_ids_look_like_prose():
    out = signals(PROSE, nonfinite_logits=True)
    assert out.failure == "non-finite logits"
    judgement = degeneration_verdict([out] + [signals(PROSE)] * 9, [signals(PROSE)] * 10)
    assert judgement.verdict == "DEGENERATE"
    assert "non-finite" in judgement.reasons[0]


def test_empty_output_is_measured_without_errors():
    out = signals([EOS, EOS, EOS], text="")
    assert out.failure == "empty output"
    assert out.eos_reached and out.n_tokens == 0
    assert (out.longest_run, out.run_token_id, out.seq_rep_4, out.tail_loop_share, out.distinct_window) == (
        0, None, 0.0, 0.0, 0.0)
    assert degeneration_verdict([out] * 4).verdict == "DEGENERATE"  # a model that only says nothing


def test_verdict_is_relative_to_the_base():
    healthy = [signals(PROSE)] * 6 + [signals(PROSE[:10] + [5, 6] * 15)] * 4  # the base loops on 40%
    same_as_base = degeneration_verdict(healthy, healthy)
    assert same_as_base.verdict == "PASS", same_as_base.reasons
    assert degeneration_verdict(healthy).verdict == "PASS"  # 40% phrase loops: normal for small greedy models
    broken = [signals([9] * 40)] * 8 + [signals(PROSE)] * 2
    judgement = degeneration_verdict(broken, healthy)
    assert judgement.verdict == "DEGENERATE"
    assert judgement.examples and "x40" in judgement.examples[0]
    slightly_worse = [signals([9] * 40)] * 2 + healthy[2:]
    assert degeneration_verdict(slightly_worse, healthy).verdict == "WARN"


def test_stopping_eos_less_often_than_the_base_warns():
    stops = [signals([*PROSE[:12], EOS])] * 10
    runs_on = [signals(PROSE)] * 10
    judgement = degeneration_verdict(runs_on, stops)
    assert judgement.verdict == "WARN"
    assert "EOS" in judgement.reasons[0]


def test_seq_rep_4_matches_its_definition():
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 - 4 / 5)
    assert seq_rep_n([1, 2, 3], 4) == 0.0


def test_nonfinite_recorder_flags_only_the_rows_with_nan_logits():
    recorder = NonFiniteRecorder()
    scores = torch.zeros(3, 5)
    scores[1, 2] = float("nan")
    scores[2] = float("-inf")
    assert recorder(torch.zeros(3, 1, dtype=torch.long), scores) is scores
    recorder(None, torch.zeros(3, 5))
    assert [recorder.row(i, 2) for i in range(3)] == [False, True, True]


def test_standard_errors_and_equal_weight_means():
    est = mean_estimate([1.0, 0.0, 1.0, 1.0])
    assert est.value == 0.75 and est.n == 4
    assert est.stderr == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 0.25, n = 4
    assert mean_estimate([1.0]).stderr is None
    macro = grouped_estimate({"a": [1.0, 1.0], "b": [0.0, 0.0, 0.0, 1.0]})
    assert macro.value == pytest.approx((1.0 + 0.25) / 2)  # not the item mean 3/6
    combined = combine_equal_weight([mean_estimate([0.0, 1.0]), mean_estimate([1.0, 1.0])])
    assert combined.stderr == pytest.approx(math.sqrt(0.25) / 2)
    paired = grouped_paired_difference({"a": {0: 1.0, 1: 1.0}}, {"a": {0: 0.0, 1: 1.0, 2: 0.0}})
    assert paired.value == 0.5 and paired.n == 2
