"""graphopt: compiler-style graph optimization of PyTorch transformers for ONNX Runtime."""

from graphopt.api import OptimizeResult, optimize
from graphopt.bundle import generate, open_generator
from graphopt.capture import capture
from graphopt.context import PassContext, Target
from graphopt.decoder import DecoderSpec, capture_decoder
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
from graphopt.instrument import Instrumentation, PassRejected
from graphopt.manager import PassManager
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, Status, register_pass
from graphopt.pipeline import create_pass, get_pass_class, parse_pipeline, registered_passes
from graphopt.program import Program
from graphopt.recipe import Recipe
from graphopt.report import Report
from graphopt.verify import Budget, Drift, drift

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CaptureError",
    "ConfigError",
    "DecoderSpec",
    "Drift",
    "ExportError",
    "GraphoptError",
    "Instrumentation",
    "OptimizeResult",
    "ParityError",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassContractError",
    "PassFailedError",
    "PassInfo",
    "PassManager",
    "PassRejected",
    "PassResult",
    "Program",
    "Recipe",
    "Report",
    "Status",
    "Target",
    "UnknownPassError",
    "VerificationError",
    "capture",
    "capture_decoder",
    "create_pass",
    "drift",
    "generate",
    "get_pass_class",
    "open_generator",
    "optimize",
    "parse_pipeline",
    "register_pass",
    "registered_passes",
]
