"""Transactional passes: a pass that fails part-way leaves the graph exactly as it was.

Failures are injected into the IR's mutators (the k-th edit of a pass raises, for several k)
and into the verification after a pass; the graph must then equal the untouched one, both
as a canonical dump and as exported ONNX bytes. Every registered pass is covered.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import pytest

from rescompile.analysis.residuals import find_residuals
from rescompile.api import build_passes, load
from rescompile.errors import RescompileError
from rescompile.frontends.onnx import load_onnx, save_onnx
from rescompile.infra import PassError, PassManager
from rescompile.ir import Graph, IRError, Node, Value, verify
from rescompile.ir._transaction import _COPIED, GraphSnapshot, transaction
from rescompile.passes import PASSES
from tools.models import build

# Every pass, with options that make it modify the model; (prerequisite passes, pass under test).
CASES = [
    ("gpt2", [], "identity"),
    ("gpt2", [], "rezero"),
    ("residual_cnn", [], "rezero:init=0"),
    ("gpt2", [], "layerscale:init=cait"),
    ("residual_cnn", [], "layerscale"),
    ("gpt2", [], "laurel:variant=rw"),
    ("gpt2", [], "laurel:variant=lr,rank=2"),
    ("gpt2", [], "laurel:variant=pa"),
    ("gpt2", [], "gate"),
    ("residual_cnn", [], "gate"),
    ("gpt2", [], "hyper:n=2,dynamic=true"),
    ("gpt2", [], "frac:m=2,dynamic=true"),
    ("gpt2", [], "dense:block_size=1"),
    ("gpt2", [], "decay:compensate=true,alpha_min=0.3"),
    ("bert", [], "deepnorm:compensate=true"),
    ("gpt2", [], "depthscale:compensate=true"),
    ("residual_cnn", [], "depthscale:compensate=true"),
    ("gpt2", ["depthscale:compensate=true"], "fold"),
    ("residual_cnn", ["layerscale"], "fold"),
    ("gpt2", [], "drop:n=1"),
    ("bert", [], "drop:n=1,unit=branch,metric=greedy"),
    ("residual_cnn", [], "drop:n=1,metric=angular"),
    ("gpt2", [], "drop:n=1,replace=linear"),
    ("gpt2", [], "parallel:c=0.5,learnable=true"),
    ("gpt2", [], "parallel:shared_norm=true"),
    ("gpt2", [], "macaron"),
    ("gpt2", [], "loop:n=3"),
    ("llama", [], "fuse"),
    ("gpt2", [], "shallow"),
    ("gpt2", [], "ladder:c=0.5,learnable=true"),
    ("gpt2", [], "rk2:method=heun,scope=layer,learnable=true"),
    ("gpt2", [], "prune:ratio=0.3"),
    ("gpt2", [], "compress:params=0.8,importance=l2,step=0.25"),
    ("residual_cnn", [], "prune:ratio=0.3,uniform=true"),
]

# Every way a pass edits the graph; a wrapper counts calls across all of them.
MUTATORS = [
    (Graph, "append"),
    (Graph, "insert_after"),
    (Graph, "insert_before"),
    (Graph, "remove"),
    (Graph, "add_initializer"),
    (Graph, "remove_initializer"),
    (Graph, "set_payload"),
    (Graph, "set_outputs"),
    (Node, "replace_input_with"),
    (Value, "replace_all_uses_with"),
]

# Failures of every origin: a bug, an IR rule, a refusal, a numpy error.
FAILURES = [
    RuntimeError("injected bug"),
    IRError("injected IR error"),
    RescompileError("injected refusal"),
    np.linalg.LinAlgError("injected numpy error"),
]


def _payload_digest(value: Value) -> str | None:
    payload = value.payload
    if payload is None:
        return None
    if hasattr(payload, "detach"):  # a torch tensor
        payload = payload.detach().numpy()
    return hashlib.sha1(payload.tobytes()).hexdigest()


def dump(graph: Graph) -> dict:
    """Everything a pass can change, by name and content (not identity)."""
    return {
        "nodes": [
            (
                n.name,
                n.domain,
                n.op_type,
                n.kind,
                repr(n.attrs),
                repr(sorted(n.meta)),
                [None if v is None else v.name for v in n.inputs],
                [o.name for o in n.outputs],
            )
            for n in graph
        ],
        "values": [
            (
                v.name,
                v.role,
                v.dtype,
                v.shape,
                _payload_digest(v),
                repr(sorted(v.meta)),
                [(u.node.name, u.index) for u in v.uses()],
            )
            for v in graph.values()
        ],
        "inputs": [v.name for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "initializers": list(graph.initializers),
        "meta": repr(graph.meta),
        "count": len(graph),
        "names": (
            sorted(graph._value_names),
            sorted(graph._node_names),
            sorted(graph._name_counters.items()),
        ),
    }


def identities(graph: Graph) -> list[int]:
    return [id(x) for x in [*graph, *graph.values()]]


def exported(graph: Graph, path) -> dict[str, bytes]:
    files = save_onnx(graph, path)
    return {f.name: f.read_bytes() for f in files}


class Injector:
    """Make the k-th call to any IR mutator raise `failure`, before or after its edit (so the
    graph may be mid-change either way), or just count calls when k is None."""

    def __init__(
        self, monkeypatch, k: int | None, failure: BaseException | None = None, *, before: bool = False
    ) -> None:
        self.calls, self.k, self.failure, self.before = 0, k, failure, before
        for owner, name in MUTATORS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, method):
        def wrapper(*args, **kwargs):
            self.calls += 1
            call = self.calls  # nested mutators (insert_before calls insert_after) count too
            if call == self.k and self.before:
                raise self.failure
            result = method(*args, **kwargs)
            if call == self.k:
                raise self.failure
            return result

        return wrapper


def _loaded(onnx_model, model: str, prerequisites: list[str]) -> Graph:
    graph = load_onnx(onnx_model(model))
    PassManager(build_passes(prerequisites))(graph)
    return graph


def test_every_pass_is_covered():
    assert {spec.split(":")[0] for _, _, spec in CASES} == set(PASSES)


@pytest.mark.parametrize(
    "model,prerequisites,spec", CASES, ids=[f"{m}-{'+'.join([*p, s])}" for m, p, s in CASES]
)
def test_failed_pass_leaves_the_graph_unchanged(
    onnx_model, tmp_path, monkeypatch, model, prerequisites, spec
):
    graph = _loaded(onnx_model, model, prerequisites)
    before, objects = dump(graph), identities(graph)
    # A dry run on a copy counts the pass's edits, so failures can be placed across all of them.
    copy = _loaded(onnx_model, model, prerequisites)
    with monkeypatch.context() as m:
        counter = Injector(m, None)
        assert PassManager(build_passes([spec]))(copy).modified or spec == "identity"
    edits = counter.calls
    assert edits > 0 or spec == "identity"
    points = sorted(
        {k for k in (1, 2, 3, edits // 4, edits // 2, 3 * edits // 4, edits - 1, edits) if 1 <= k <= edits}
    )
    for i, k in enumerate(points):
        failure = FAILURES[i % len(FAILURES)]
        if spec.startswith("compress") and isinstance(failure, IRError):
            # compress counts each block's parameters by removing it on a snapshot, and an
            # IRError there means "this block cannot be removed alone" (it is counted another
            # way): an injected one is absorbed by design, so inject another kind of failure.
            failure = FAILURES[0]
        with monkeypatch.context() as m:
            Injector(m, k, failure, before=i % 2 == 1)
            with pytest.raises(PassError) as info:
                PassManager(build_passes([spec]))(graph)
        message = str(info.value)
        assert info.value.__cause__ is failure and "\n" not in message
        assert message.startswith(f"pass {spec.split(':')[0]}: ") and str(failure) in message
        if not isinstance(failure, RescompileError):
            assert type(failure).__name__ in message
        assert dump(graph) == before, f"edit {k} of {edits}"
        assert identities(graph) == objects
        verify(graph)
    # A pass that completes but leaves an invalid graph is rolled back too.
    with monkeypatch.context() as m:
        m.setattr("rescompile.infra.verify", _raise(IRError("injected invalid graph")))
        with pytest.raises(PassError, match="left an invalid graph: injected invalid graph"):
            PassManager(build_passes([spec]))(graph)
    assert dump(graph) == before
    verify(graph)
    untouched = _loaded(onnx_model, model, prerequisites)
    assert exported(graph, tmp_path / "restored" / "m.onnx") == exported(
        untouched, tmp_path / "fresh" / "m.onnx"
    )


@pytest.mark.parametrize("spec", ["rezero", "depthscale:compensate=true", "hyper:n=2"])
def test_failed_pass_leaves_a_torch_graph_unchanged(monkeypatch, spec):
    case = build("residual_mlp")
    graph = load(case.module, case.args)
    before, objects = dump(graph), identities(graph)
    copy = load(case.module, case.args)
    with monkeypatch.context() as m:
        counter = Injector(m, None)
        PassManager(build_passes([spec]))(copy)
    for k in (1, counter.calls // 2, counter.calls):
        with monkeypatch.context() as m:
            Injector(m, k, RuntimeError("injected"))
            with pytest.raises(PassError, match="RuntimeError: injected"):
                PassManager(build_passes([spec]))(graph)
        assert dump(graph) == before and identities(graph) == objects


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def test_the_injection_detects_a_pass_run_without_a_transaction(onnx_model, monkeypatch):
    """The check above can fail: without the transaction, the same failure leaves edits behind."""
    graph = _loaded(onnx_model, "gpt2", [])
    before = dump(graph)
    monkeypatch.setattr("rescompile.infra.transaction", lambda graph: contextlib.nullcontext())
    Injector(monkeypatch, 3, RuntimeError("injected"))
    with pytest.raises(PassError):
        PassManager(build_passes(["rezero"]))(graph)
    assert dump(graph) != before


def test_a_bug_names_the_pass_the_site_and_the_exception(onnx_model, monkeypatch):
    graph = _loaded(onnx_model, "gpt2", [])
    first = find_residuals(graph).sites[0].name
    Injector(monkeypatch, 1, IndexError("tuple index out of range"))  # rezero's first edit, at its first site
    with pytest.raises(PassError) as info:
        PassManager(build_passes(["identity", "rezero"]))(graph)
    assert (
        str(info.value) == f"pass rezero (after identity): site {first}: IndexError: tuple index out of range"
    )


# ----- GraphSnapshot on its own --------------------------------------------------------


def chain(blocks: int) -> Graph:
    """x -> [x + relu(x @ w_i)] * blocks, one residual stream."""
    graph = Graph()
    x = graph.add_input(Value("x", dtype="float32", shape=(2, 4)))
    for i in range(blocks):
        w = graph.add_param(f"w{i}", np.eye(4, dtype=np.float32), dtype="float32")
        mm = graph.append(Node("MatMul", [x, w], name=f"mm{i}"))
        relu = graph.append(Node("Relu", [mm.output], name=f"relu{i}"))
        add = graph.append(Node("Add", [x, relu.output], name=f"add{i}"))
        for node in (mm, relu, add):
            node.output.dtype, node.output.shape = "float32", (2, 4)
        x = add.output
    graph.set_outputs([x])
    return graph


def test_snapshot_restores_every_kind_of_edit_into_the_same_objects():
    graph = chain(3)
    before, objects = dump(graph), identities(graph)
    nodes, values = list(graph), list(graph.values())
    snapshot = GraphSnapshot.take(graph)
    mm0, relu0, add0 = nodes[:3]
    # Edits through the API ...
    scale = graph.add_param("s", np.float32(2), dtype="float32")
    mul = Node("Mul", [relu0.output, scale], name="add0")  # a name clash: renamed on insertion
    graph.insert_before(add0, mul)
    add0.replace_input_with(1, mul.output)
    graph.set_payload(graph.initializers["w1"], np.zeros((4, 4), np.float32))
    last = nodes[-1]
    graph.set_outputs([relu0.output])
    graph.remove(last)
    graph.remove(nodes[-2])
    # ... and by hand.
    mm0.attrs["transA"] = 1
    mm0.meta["pass"] = "x"
    relu0.output.shape = None
    graph.inputs[0].name = "renamed"
    graph.meta["k"] = 1
    assert dump(graph) != before
    snapshot.restore()
    assert dump(graph) == before and identities(graph) == objects
    assert list(graph) == nodes and list(graph.values()) == values
    verify(graph)
    # A snapshot survives edits made after a restore, so it can be restored again.
    add0.replace_input_with(0, None)
    nodes[0].meta["again"] = True
    snapshot.restore()
    assert dump(graph) == before
    verify(graph)


def test_transaction_restores_on_any_exception_and_keeps_successful_edits():
    graph = chain(2)
    before = dump(graph)
    with pytest.raises(KeyboardInterrupt), transaction(graph):
        graph.set_outputs([graph.inputs[0]])
        raise KeyboardInterrupt
    assert dump(graph) == before
    with transaction(graph):
        graph.add_param("kept", np.ones(3, np.float32), dtype="float32")
    assert "kept" in graph.initializers


def test_every_mutable_slot_is_copied():
    """A new container slot on Node or Value must be copied by snapshots, not shared."""
    graph = chain(1)
    for obj in [*graph, *graph.values()]:
        for slot in type(obj).__slots__:
            if isinstance(getattr(obj, slot), (dict, list, set)):
                assert slot in _COPIED, f"{type(obj).__name__}.{slot}"
