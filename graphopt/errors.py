"""Errors graphopt raises. Each names what went wrong and, where it can, what to do."""


class GraphoptError(Exception):
    """Base class of graphopt errors."""


class CaptureError(GraphoptError):
    """The model could not be captured as a graph."""


class ConfigError(GraphoptError, ValueError):
    """A pass option, pipeline string or recipe key is wrong."""


class UnknownPassError(ConfigError):
    """A pipeline names a pass that is not registered."""


class PipelineSyntaxError(ConfigError):
    """A textual pipeline could not be parsed."""


class PassContractError(GraphoptError):
    """A pass broke the pass contract (wrong return type, modified=False but changed the graph)."""


class VerificationError(GraphoptError):
    """A pass moved the outputs further than its tolerance or the budget allows."""


class PassFailedError(GraphoptError):
    """A pass failed and the recipe says to stop."""


class ExportError(GraphoptError):
    """ONNX export or the ONNX checker failed."""


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from the PyTorch program's beyond tolerance."""
