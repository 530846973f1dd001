"""graphopt: compiler-style graph optimization of PyTorch transformers for ONNX Runtime."""

from graphopt.api import OptimizeResult, optimize
from graphopt.capture import capture
from graphopt.manager import PassManager
from graphopt.pipeline import parse_pipeline
from graphopt.recipe import Recipe
from graphopt.report import Report
from graphopt.verify import Budget, Drift, drift
from graphopt.errors import (
    CaptureError,
    ConfigError,
    ExportError,
    GraphoptError,
    ParityError,
    PassContractError,
    PassFailedError,
    UnknownPassError,
    VerificationError,
)
from graphopt.passbase import Pass, PassConfig, PassResult, create_pass, get_pass_class, register_pass, registered_passes
from graphopt.program import Program

__version__ = "0.1.0"

__all__ = [
    "capture",
    "optimize",
    "OptimizeResult",
    "PassManager",
    "parse_pipeline",
    "Recipe",
    "Report",
    "Budget",
    "Drift",
    "drift",
    "Program",
    "Pass",
    "PassConfig",
    "PassResult",
    "register_pass",
    "registered_passes",
    "get_pass_class",
    "create_pass",
    "GraphoptError",
    "CaptureError",
    "ConfigError",
    "UnknownPassError",
    "PassContractError",
    "VerificationError",
    "PassFailedError",
    "ExportError",
    "ParityError",
]
