"""The program runner interprets validated nodes: exact results, no generated code, bounds."""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest
import torch
from torch.export import Dim, export

from graft.errors import ProgramError
from graft.export.program import program_to_json
from graft.runtime.program import Program, program_from_json
from tests.conftest import TinyCNN, TinyTransformer, token_batch

EXACT = {"rtol": 0.0, "atol": 0.0}
_EVENTS: list[str] = []
_WATCHED = {"compile", "exec", "import", "builtins.input", "os.system", "subprocess.Popen",
            "pickle.find_class", "open"}


def _hook(event: str, args: Any) -> None:
    if event in _WATCHED and _EVENTS and _EVENTS[0] == "on":
        _EVENTS.append(event)


sys.addaudithook(_hook)  # audit hooks cannot be removed; this one records only when switched on


class _Watch:
    """Collects audited events that a program build or run must never cause."""

    def __enter__(self) -> list[str]:
        _EVENTS[:] = ["on"]
        return _EVENTS

    def __exit__(self, *exc: Any) -> None:
        _EVENTS[0] = "off"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    return state


def _exported(model: torch.nn.Module, args: tuple, dynamic: tuple, names: list[str]):
    ep = export(model, args, dynamic_shapes=dynamic, strict=False)
    return program_to_json(ep, input_names=names), dict(ep.constants)


def test_building_and_running_a_program_compiles_and_imports_nothing(tiny_cnn, images):
    graph, constants = _exported(tiny_cnn.eval(), (images,), ({0: Dim.DYNAMIC},), ["images"])
    program_from_json(graph, train=False)(_state(tiny_cnn), constants, [images])  # warm-up
    with _Watch() as events:
        program = program_from_json(graph, train=False)
        with torch.no_grad():
            program(_state(tiny_cnn), constants, [images])
        program.code()
    assert events[1:] == []


def test_the_cnn_program_equals_eager_in_eval_and_train(tiny_cnn, images):
    reference = copy.deepcopy(tiny_cnn)
    for train in (False, True):
        tiny_cnn.train(train)
        reference.train(train)
        graph, constants = _exported(tiny_cnn, (images,), ({0: Dim.DYNAMIC},), ["images"])
        program = program_from_json(graph, train=train)
        state = {k: v.detach().clone() for k, v in _state(reference).items()}
        torch.manual_seed(3)
        got = program(state, constants, [images])[0]
        torch.manual_seed(3)
        want = reference(images)
        torch.testing.assert_close(got, want, **EXACT)
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(state[name], buffer, **EXACT, msg=name)


def test_the_transformer_program_equals_eager_with_gradients(tiny_transformer):
    ids, mask = token_batch(3, 7)
    model = tiny_transformer.train()
    graph, constants = _exported(model, (ids, mask), ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},) * 2,
                                 ["input_ids", "attention_mask"])
    reference = copy.deepcopy(model)
    program = program_from_json(graph)
    torch.manual_seed(5)
    program(_state(model), constants, [ids, mask])[0].square().sum().backward()
    torch.manual_seed(5)
    reference(ids, mask).square().sum().backward()
    grads = {k: p.grad for k, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], **EXACT, msg=name)


def _size_program(scale: int) -> dict[str, Any]:
    return {"format": "graft.graph/1", "inputs": [{"name": "x", "kind": "input"}],
            "nodes": [{"name": "n", "target": "aten.sym_size.int", "args": [{"ref": "x"}, 0],
                       "kwargs": {}},
                      {"name": "big", "target": "operator.mul", "args": [{"ref": "n"}, scale],
                       "kwargs": {}},
                      {"name": "full", "target": "aten.full.default",
                       "args": [[{"ref": "big"}, {"ref": "big"}], 1.0], "kwargs": {}}],
            "outputs": [{"kind": "output", "value": {"ref": "full"}}]}


def test_symbolic_sizes_are_checked_before_allocating():
    program = program_from_json(_size_program(1_000_000))
    with pytest.raises(ProgramError, match=r"node 'full' \(aten.full.default\) asks for "
                                           r"4000000000000 elements, over the limit"):
        program({}, {}, [torch.zeros(2)])
    small = program_from_json(_size_program(3))([], {}, [torch.zeros(2)])[0]
    assert small.shape == (6, 6)


def test_a_write_through_an_undeclared_alias_is_refused_at_run_time():
    # type_as returns its input unchanged when the dtypes agree, which its schema does not
    # say; the runner still refuses the in-place write into the parameter.
    graph = {"format": "graft.graph/1",
             "inputs": [{"name": "p_w", "kind": "parameter", "target": "w"},
                        {"name": "x", "kind": "input"}],
             "nodes": [{"name": "same", "target": "aten.type_as.default",
                        "args": [{"ref": "p_w"}, {"ref": "x"}], "kwargs": {}},
                       {"name": "write", "target": "aten.add_.Tensor",
                        "args": [{"ref": "same"}, 1], "kwargs": {}}],
             "outputs": [{"kind": "output", "value": {"ref": "write"}}]}
    weight = torch.zeros(3)
    with pytest.raises(ProgramError, match="would write into a parameter"):
        program_from_json(graph)({"w": weight}, {}, [torch.zeros(3)])
    assert weight.eq(0).all()
    out = program_from_json(graph)({"w": weight}, {}, [torch.zeros(3, dtype=torch.float64)])
    assert out[0].eq(1).all() and weight.eq(0).all()  # a fresh copy may be written


def test_an_operator_failure_names_the_node():
    graph = {"format": "graft.graph/1", "inputs": [{"name": "a", "kind": "input"},
                                                   {"name": "b", "kind": "input"}],
             "nodes": [{"name": "prod", "target": "aten.mm.default",
                        "args": [{"ref": "a"}, {"ref": "b"}], "kwargs": {}}],
             "outputs": [{"kind": "output", "value": {"ref": "prod"}}]}
    with pytest.raises(ProgramError, match=r"node 'prod' \(aten.mm.default\) failed: "
                                           "RuntimeError"):
        program_from_json(graph)({}, {}, [torch.zeros(2, 3), torch.zeros(2, 3)])


def test_factories_follow_the_module_device():
    graph = {"format": "graft.graph/1", "inputs": [{"name": "x", "kind": "input"}],
             "nodes": [{"name": "z", "target": "aten.zeros.default", "args": [[2]],
                        "kwargs": {"device": {"device": "cuda"}}}],
             "outputs": [{"kind": "output", "value": {"ref": "z"}}]}
    out = program_from_json(graph, device=torch.device("meta"))({}, {}, [torch.zeros(1)])
    assert out[0].device.type == "meta"


def test_buffer_mutations_are_copied_into_the_module_state():
    graph = {"format": "graft.graph/1",
             "inputs": [{"name": "b_n", "kind": "buffer", "target": "n"},
                        {"name": "x", "kind": "input"}],
             "nodes": [{"name": "next", "target": "aten.add.Tensor", "args": [{"ref": "b_n"}, 1],
                        "kwargs": {}}],
             "outputs": [{"kind": "output", "value": {"ref": "x"}},
                         {"kind": "buffer_mutation", "target": "n", "value": {"ref": "next"}}]}
    counter = torch.zeros((), dtype=torch.int64)
    program = program_from_json(graph)
    for _ in range(3):
        program({"n": counter}, {}, [torch.ones(1)])
    assert int(counter) == 3


def test_values_are_dropped_after_their_last_use(tiny_cnn, images):
    graph, constants = _exported(tiny_cnn.eval(), (images,), ({0: Dim.DYNAMIC},), ["images"])
    program: Program = program_from_json(graph, train=False)
    freed = [slot for step in program._steps for slot in step.free]
    outputs = {o.value.slot for o in program.outputs}
    node_slots = {step.slot for step in program._steps}
    # Every intermediate except the outputs (and nodes nothing reads) is released once.
    read = {s for step in program._steps for _, s in step.refs}
    assert sorted(freed) == sorted(set(freed))
    assert (node_slots & read) - outputs <= set(freed)
