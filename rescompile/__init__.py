"""rescompile: a graph-rewriting compiler for the residual connections of neural networks.

import rescompile
report = rescompile.inspect("model.onnx")        # where are the residual adds?
proto = rescompile.apply("model.onnx", ["rezero"])  # rewrite them
result = rescompile.validate("model.onnx", proto)   # same outputs?
"""

from rescompile.api import InspectReport, apply, inspect, validate
from rescompile.errors import RescompileError

__all__ = ["inspect", "apply", "validate", "InspectReport", "RescompileError", "__version__"]
__version__ = "0.1.0"
