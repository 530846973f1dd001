"""ONNX export, ONNX Runtime sessions and parity checks (installed as ``graphopt.export``)."""

from .onnx_export import (
    ExportResult,
    UnsafeExternalDataError,
    check_model_file,
    to_onnx,
    validate_external_data_location,
    validate_model_external_data,
)
from .lowerings import lowering_table, register_lowering
from .parity import OutputParity, ParityReport, check_parity, random_inputs
from .session import (
    KNOWN_SLOW_FUSIONS,
    ProviderError,
    alternating_latency,
    available_providers,
    interleaved_latency,
    make_session,
    measure_latency,
    run,
    tune_disabled_optimizers,
)

__all__ = [
    "alternating_latency",
    "KNOWN_SLOW_FUSIONS",
    "tune_disabled_optimizers",
    "to_onnx",
    "register_lowering",
    "lowering_table",
    "ExportResult",
    "check_model_file",
    "validate_external_data_location",
    "validate_model_external_data",
    "UnsafeExternalDataError",
    "make_session",
    "available_providers",
    "run",
    "measure_latency",
    "interleaved_latency",
    "ProviderError",
    "check_parity",
    "random_inputs",
    "ParityReport",
    "OutputParity",
]
