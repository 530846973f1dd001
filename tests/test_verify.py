"""Drift is NaN- and inf-aware, pools several batches, and reports per-sample cosines."""

import math

import pytest
import torch

from graphopt.verify import Budget, drift, drift_many


def test_nan_in_the_candidate_is_a_failure_not_a_skipped_value():
    ref = (torch.ones(2, 3),)
    got = (torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]]),)
    result = drift(ref, got)
    assert result.problem and "1 non-finite" in result.problem
    assert result.cosine == -1.0 and math.isinf(result.max_rel)
    assert Budget(min_cosine=-1.0).check(result)  # no budget accepts it


def test_inf_against_inf_of_the_other_sign_is_a_failure_and_equal_infinities_agree():
    ref = (torch.tensor([[1.0, float("inf"), 2.0]]),)
    assert drift(ref, (torch.tensor([[1.0, float("-inf"), 2.0]]),)).problem
    same = drift(ref, (torch.tensor([[1.0, float("inf"), 2.0]]),))
    assert not same.problem and same.max_abs == 0.0 and same.cosine == pytest.approx(1.0)


def test_nan_in_both_at_the_same_place_agrees():
    ref = (torch.tensor([[float("nan"), 1.0]]),)
    assert not drift(ref, (torch.tensor([[float("nan"), 1.0]]),)).problem


def test_nan_at_a_padded_position_is_seen_when_every_position_counts_and_ignored_on_real_ones():
    ref = (torch.ones(1, 3, 2),)
    got = (torch.tensor([[[1.0, 1.0], [1.0, 1.0], [float("nan"), 1.0]]]),)
    valid = torch.tensor([[True, True, False]])
    assert drift(ref, got).problem
    assert not drift(ref, got, valid).problem


def test_scale_error_moves_max_rel_but_not_cosine():
    ref = (torch.randn(4, 8),)
    result = drift(ref, (ref[0] * 1.5,))
    assert result.cosine == pytest.approx(1.0) and result.max_rel == pytest.approx(0.5)
    assert "max_rel" in Budget(min_cosine=0.99, max_rel=0.1).check(result)


def test_pooled_over_batches_and_per_sample():
    torch.manual_seed(0)
    refs = [(torch.randn(3, 5),), (torch.randn(1, 7),)]
    # one sample of the second batch is flipped: pooled cosine stays high, its own is -1
    cands = [(refs[0][0].clone(),), (-refs[1][0],)]
    result = drift_many(refs, cands)
    assert result.samples == 4
    assert result.min_sample_cosine == pytest.approx(-1.0)
    assert result.cosine > -1.0
    assert "min_sample_cosine" in Budget(min_cosine=-1.0, min_sample_cosine=0.9).check(result)


def test_shape_and_count_mismatches_are_problems():
    assert "shape" in drift((torch.ones(2, 3),), (torch.ones(3, 2),)).problem
    assert "outputs number" in drift((torch.ones(2),), (torch.ones(2), torch.ones(2))).problem
