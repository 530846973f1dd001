"""ONNX export, ONNX Runtime sessions and parity checks (installed as ``graphopt.export``)."""

from .lowerings import lowering_table, register_lowering
from .onnx_export import (
    ExportResult,
    UnsafeExternalDataError,
    check_model_file,
    to_onnx,
    validate_external_data_location,
    validate_model_external_data,
)
from .op_parity import OpCheck, OpSite
from .parity import (
    OutputParity,
    ParityReport,
    check_parity,
    input_sets,
    quantizes_at_run_time,
    random_inputs,
)
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
    "KNOWN_SLOW_FUSIONS",
    "ExportResult",
    "OpCheck",
    "OpSite",
    "OutputParity",
    "ParityReport",
    "ProviderError",
    "UnsafeExternalDataError",
    "alternating_latency",
    "available_providers",
    "check_model_file",
    "check_parity",
    "input_sets",
    "interleaved_latency",
    "lowering_table",
    "make_session",
    "measure_latency",
    "quantizes_at_run_time",
    "random_inputs",
    "register_lowering",
    "run",
    "to_onnx",
    "tune_disabled_optimizers",
    "validate_external_data_location",
    "validate_model_external_data",
]
