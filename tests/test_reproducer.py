"""A crash reproducer saves the pass context with the program, so a crash that depends on
the context (calibration data, the teacher) re-runs with one command and fails the same way."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt import PassContext
from graphopt.repro import load_reproducer, rerun_reproducer


class TwoLayers(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def program():
    torch.manual_seed(0)
    return graphopt.capture(TwoLayers(), (torch.randn(3, 8),))


def crash_of(result, name):
    record = next(r for r in result.report.passes if r.name == name)
    assert record.status == "rolled-back" and record.reproducer, record
    return record, Path(record.reproducer)


CALIBRATION_CRASH = "Guard failed: x.size()[1] == 8"


def test_a_calibrated_quantize_crash_reruns_from_its_saved_calibration(program, tmp_path):
    # Calibration batches 5 wide for a layer 8 wide: static quantization's range observation
    # crashes (the captured program's shape guard refuses them). Only the saved context can make the re-run fail the same way: on the example
    # inputs (what a reproducer without the context would calibrate on) it succeeds.
    calibration = (((torch.randn(2, 5),), {}),)
    ctx = PassContext(calibration=calibration, calibration_source="5-wide batches")
    result = graphopt.optimize(program, "quantize{mode=static}", context=ctx, reproducer_dir=tmp_path)
    record, folder = crash_of(result, "quantize")
    assert CALIBRATION_CRASH in record.reason

    loaded_program, pass_obj, loaded_ctx = load_reproducer(folder)
    assert str(pass_obj) == "quantize{mode=static}"
    assert torch.equal(loaded_ctx.calibration[0][0][0], calibration[0][0][0])
    with pytest.raises(AssertionError, match=re.escape(CALIBRATION_CRASH)):
        rerun_reproducer(folder)
    assert pass_obj(loaded_program, PassContext()).modified  # without the context it would not crash

    # and with one command, as the report says
    run = subprocess.run([sys.executable, "-m", "graphopt.cli", "repro", str(folder)], check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and CALIBRATION_CRASH in run.stderr


def test_a_distill_crash_reruns_with_its_saved_teacher(program, tmp_path):
    # A teacher whose outputs do not correspond to the student's: distillation refuses to
    # start. The reproducer must bring that teacher back (without one, distill says it has none).
    torch.manual_seed(1)
    teacher = graphopt.capture(TwoLayers(), (torch.randn(5, 8),), dynamic_shapes=None)
    ctx = PassContext(teacher=teacher, calibration=((((torch.randn(3, 8),), {}),)))
    result = graphopt.optimize(program, "distill{steps=5,progress=false}", context=ctx, reproducer_dir=tmp_path)
    record, folder = crash_of(result, "distill")
    assert "teacher and student outputs do not correspond" in record.reason

    _, _, loaded_ctx = load_reproducer(folder)
    assert loaded_ctx.teacher is not None and tuple(loaded_ctx.teacher.args[0].shape) == (5, 8)
    with pytest.raises(Exception, match="teacher and student outputs do not correspond"):
        rerun_reproducer(folder)
