"""Reading training curves at equal tokens, and the paired error bar on a bits-per-byte difference."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.compare import matched_heldout, reach_section
from eval.compare_plots import plot_curves
from eval.compare_runs import RunRecord, arms_of
from eval.dynamics import (
    HELDOUT_BITS_PER_BYTE,
    Curve,
    difference,
    read_curve,
    seed_band,
    smoothed,
    tokens_to_reach,
    value_at,
    window_differences,
)
from eval.stats import paired_difference, paired_ratio_difference


def test_a_curve_is_read_against_tokens_seen_and_a_resumed_run_counts_once():
    history = [
        {"step": 1, "loss": 3.0, "tokens_seen": 100},
        {"step": 2, "loss": 2.0, "tokens_seen": 200},
        {"step": 2, "loss": 2.5, "tokens_seen": 200},  # logged again after a resume: the later entry wins
        {"step": 3, "tokens_seen": 300, "heldout_loss": 1.5, "heldout_bits_per_byte": 0.9},
        {"train_runtime": 12.0, "step": 3},  # the Trainer's closing summary: no curve point
        {"step": 4, "loss": float("nan"), "tokens_seen": 400},
    ]
    assert read_curve(history, "loss") == Curve((100.0, 200.0), (3.0, 2.5))
    assert read_curve(history, "heldout_bits_per_byte") == Curve((300.0,), (0.9,))
    assert read_curve([{"step": 1, "loss": 3.0}], "loss") is None  # no tokens_seen: not placeable at equal tokens


def test_values_are_read_between_logged_points_and_never_outside_them():
    curve = Curve((100.0, 200.0, 400.0), (3.0, 2.0, 1.0))
    assert value_at(curve, 150) == pytest.approx(2.5)
    assert value_at(curve, 300) == pytest.approx(1.5)
    assert value_at(curve, 400) == 1.0
    assert value_at(curve, 99) is None and value_at(curve, 401) is None


def test_a_loss_is_reached_where_the_curve_stays_below_it():
    curve = Curve((100.0, 200.0, 300.0, 400.0), (3.0, 2.0, 2.5, 1.0))
    assert tokens_to_reach(curve, 2.2) == pytest.approx(320.0)  # the dip to 2.0 at 200 climbed back out
    assert tokens_to_reach(curve, 2.5) == pytest.approx(150.0)  # 2.5 itself counts as reached
    assert tokens_to_reach(curve, 3.5) == 100.0
    assert tokens_to_reach(curve, 0.5) is None


def test_smoothing_keeps_a_flat_curve_flat_from_its_first_point():
    flat = Curve(tuple(float(t) for t in range(10)), (2.0,) * 10)
    assert smoothed(flat).values == pytest.approx((2.0,) * 10)  # no pull towards 0 at the start
    noisy = Curve(tuple(float(t) for t in range(40)), tuple(2.0 + (-1) ** t for t in range(40)))
    spread = max(noisy.values) - min(noisy.values)
    assert max(smoothed(noisy).values[10:]) - min(smoothed(noisy).values[10:]) < spread / 2


def test_two_runs_differ_step_by_step_at_the_token_counts_both_logged_and_by_stretch_of_training():
    delta = difference(Curve((1.0, 2.0, 3.0, 4.0, 5.0), (5.0, 4.0, 3.0, 2.0, 1.0)),
                       Curve((2.0, 3.0, 4.0, 5.0, 6.0), (4.5, 3.5, 2.0, 1.5, 1.0)))
    assert delta == Curve((2.0, 3.0, 4.0, 5.0), (-0.5, -0.5, 0.0, -0.5))
    (first_start, first_end, first), (second_start, second_end, second) = window_differences(delta, 2)
    assert (first_start, first_end, first.value, first.stderr) == (2.0, 3.0, -0.5, 0.0)
    assert (second_start, second_end, second.value, second.n) == (4.0, 5.0, -0.25, 2)


def test_a_seed_band_spans_the_seeds_where_all_of_them_logged():
    band = seed_band([Curve((0.0, 10.0, 20.0), (3.0, 2.0, 1.0)), Curve((0.0, 10.0), (5.0, 4.0))])
    assert band.tokens == (0.0, 10.0)
    assert band.mean == (4.0, 3.0) and band.low == (3.0, 2.0) and band.high == (5.0, 4.0)


def test_a_bits_per_byte_difference_is_the_difference_of_the_totals_with_a_paired_error_bar():
    bits_a, bits_b, byte_counts = [120.0, 30.0, 410.0, 75.0], [130.0, 29.0, 440.0, 80.0], [100, 40, 500, 90]
    estimate = paired_ratio_difference(bits_a, bits_b, byte_counts)
    assert estimate.value == pytest.approx(sum(bits_a) / sum(byte_counts) - sum(bits_b) / sum(byte_counts))
    assert estimate.n == 4 and estimate.stderr > 0
    # Documents of equal length weigh equally: then it is the plain paired difference of per-document bits per byte.
    equal = paired_ratio_difference(bits_a, bits_b, [100] * 4)
    plain = paired_difference({i: a / 100 for i, a in enumerate(bits_a)}, {i: b / 100 for i, b in enumerate(bits_b)})
    assert equal.value == pytest.approx(plain.value) and equal.stderr == pytest.approx(plain.stderr)
    assert paired_ratio_difference([1.0], [2.0], [10]).stderr is None



def logged_run(name: str, seed: int, heldout: list[tuple[int, float]]) -> RunRecord:
    """A run as compare reads it, its log history in the train stage's format: a loss entry every step and, every
    eval_steps, an entry with exactly step, tokens_seen, heldout_loss and heldout_bits_per_byte."""
    history = [{"step": step, "loss": 3.0 - 0.1 * step, "tokens_seen": 500 * step} for step in range(1, 5)]
    history += [{"step": tokens // 500, "tokens_seen": tokens, "heldout_loss": 2 * bpb, "heldout_bits_per_byte": bpb}
                for tokens, bpb in heldout]
    return RunRecord(Path("/runs") / name, {"seed": seed}, {}, history)


def test_the_in_training_held_out_loss_is_compared_at_matched_tokens_and_seed_by_seed(tmp_path):
    arms = arms_of([
        logged_run("graft", 0, [(1000, 1.0), (2000, 0.8)]), logged_run("graft-seed1", 1, [(1000, 1.1), (2000, 0.9)]),
        logged_run("control", 0, [(1000, 1.2), (2000, 1.0)]),
        logged_run("control-seed1", 1, [(1000, 1.3), (2000, 0.9)]),
    ])
    rows = {row["tokens"]: row for row in matched_heldout(arms, "control")}
    assert sorted(rows) == [1000, 2000]
    # seed 0: 1.0 - 1.2 and 0.8 - 1.0; seed 1: 1.1 - 1.3 and 0.9 - 0.9
    assert rows[1000]["delta"]["value"] == pytest.approx(-0.2) and rows[1000]["delta"]["stderr"] == pytest.approx(0)
    assert rows[2000]["delta"]["value"] == pytest.approx(-0.1) and rows[2000]["delta"]["stderr"] == pytest.approx(0.1)
    assert rows[2000]["over"] == "seeds" and rows[2000]["delta"]["n"] == 2

    reach = reach_section(arms, "control", HELDOUT_BITS_PER_BYTE, smooth=False)
    assert reach["target"] == pytest.approx(0.95)  # the control's final held-out loss, mean of its seeds
    tokens = {row["run"]: row["tokens"] for row in reach["runs"]}
    assert tokens["graft"] == pytest.approx(1250) and tokens["graft-seed1"] == pytest.approx(1750)
    assert tokens["control"] is None and tokens["control-seed1"] == pytest.approx(1875)
    assert reach["arms"]["graft"]["value"] == pytest.approx(1500) and "control" not in reach["arms"]

    drawn = plot_curves(arms, "control", HELDOUT_BITS_PER_BYTE, False, tmp_path / "h.png", "bits", "t")
    assert drawn == ["graft", "control"]
    assert (tmp_path / "h.png").stat().st_size > 10_000
