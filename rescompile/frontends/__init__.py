"""Frontends: ONNX (onnx.py) and torch (torch.py) to and from the IR.

The torch frontend imports torch; the ONNX one never does.
"""

from rescompile.ir import Graph

__all__ = ["is_torch_graph"]


def is_torch_graph(graph: Graph) -> bool:
    """Whether `graph` came from the torch frontend (checked without importing torch)."""
    return type(graph.source).__name__ == "TorchSource"
