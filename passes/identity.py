"""identity: changes nothing. `apply -p identity` is the import/export round-trip check."""

from __future__ import annotations

from rescompile.infra import PassBase, PassResult
from rescompile.ir import Graph

__all__ = ["IdentityPass"]


class IdentityPass(PassBase):
    """Leave the graph as it is; the output must be bit-identical in ONNX Runtime."""

    name = "identity"
    summary = "change nothing (round-trip check)"

    def call(self, graph: Graph) -> PassResult:
        return PassResult(graph, modified=False)
