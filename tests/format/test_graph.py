"""The program reader refuses every program that is not exactly what graft.graph/1 allows."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from graft.errors import FormatError, UnsafeContentError
from graft.format import graph as g
from graft.format.arguments import Ref, Tag
from graft.format.graph import graph_from_json, graph_text, read_graph

SHELL = "__import__('os').system('touch /tmp/graft-pwned')"


def _base() -> dict[str, Any]:
    return {
        "format": "graft.graph/1",
        "inputs": [{"name": "p_w", "kind": "parameter", "target": "w"},
                   {"name": "b_count", "kind": "buffer", "target": "count"},
                   {"name": "x", "kind": "input"}],
        "nodes": [{"name": "mm", "target": "aten.mm.default",
                   "args": [{"ref": "x"}, {"ref": "p_w"}], "kwargs": {}},
                  {"name": "act", "target": "aten.gelu.default", "args": [{"ref": "mm"}],
                   "kwargs": {"approximate": "tanh"}}],
        "outputs": [{"kind": "output", "value": {"ref": "act"}}],
    }


def _with_node(node: dict[str, Any], *, output: str | None = None) -> dict[str, Any]:
    graph = _base()
    graph["nodes"].append(node)
    if output is not None:
        graph["outputs"] = [{"kind": "output", "value": {"ref": output}}]
    return graph


def _node(target: str, *args: Any, name: str = "extra", **kwargs: Any) -> dict[str, Any]:
    return {"name": name, "target": target, "args": list(args), "kwargs": kwargs}


def _read(graph: dict[str, Any], train: bool = True) -> g.Graph:
    return read_graph(json.dumps(graph).encode(), name="programs/forward.eval.json",
                      train=train)


def test_a_valid_program_becomes_frozen_dataclasses():
    graph = _read(_base())
    assert [i.kind for i in graph.inputs] == ["parameter", "buffer", "input"]
    mm, act = graph.nodes
    assert mm.args == (Ref(2), Ref(0)) and act.kwargs == (("approximate", "tanh"),)
    assert graph.outputs[0].value == Ref(4)
    with pytest.raises(AttributeError):
        mm.target = "aten.from_file.default"  # frozen


@pytest.mark.parametrize("where", ["input", "node"])
def test_a_name_carrying_python_is_refused(where):
    graph = _base()
    if where == "input":
        graph["inputs"][2]["name"] = f"x={SHELL}"
    else:
        graph["nodes"][0]["name"] = SHELL
    with pytest.raises(UnsafeContentError, match="is not an identifier"):
        _read(graph)


def test_names_are_matched_whole_not_by_prefix():
    graph = _base()
    graph["inputs"][2]["name"] = "x\n"
    with pytest.raises(UnsafeContentError, match=r"'x\\n' is not an identifier"):
        _read(graph)


def test_a_keyword_key_carrying_python_is_refused():
    graph = _base()
    graph["nodes"][1]["kwargs"] = {f"approximate={SHELL}": "tanh"}
    with pytest.raises(UnsafeContentError, match="keyword .* is not an identifier"):
        _read(graph)


def test_a_keyword_the_schema_does_not_have_is_refused():
    graph = _base()
    graph["nodes"][1]["kwargs"] = {"evil": "tanh"}
    with pytest.raises(UnsafeContentError, match="aten.gelu.default has no argument 'evil'"):
        _read(graph)


@pytest.mark.parametrize("target", [
    "aten.from_file.default", "aten.save.default", "prims.__dict__.__setitem__",
    "aten.__class__.__init__", "builtins.exec", "os.system", "aten.add.NoSuchOverload",
    "aten.add_.out", "aten._foreach_add_.Scalar", "aten.set_.source_Tensor",
    "aten.empty.memory_format",
])
def test_a_target_outside_the_operator_list_is_refused(target):
    graph = _with_node(_node(target, "/etc/passwd"))
    with pytest.raises(UnsafeContentError, match=r"node 2 \(extra\): it calls .* which is not "
                                                 "in Graft's operator list"):
        _read(graph)


def test_the_message_names_file_node_and_reason():
    graph = _with_node(_node("aten.from_file.default", "/etc/passwd", True, 100))
    with pytest.raises(UnsafeContentError) as info:
        _read(graph)
    message = str(info.value)
    assert message.startswith("program programs/forward.eval.json, node 2 (extra): it calls "
                              "'aten.from_file.default'")


@pytest.mark.parametrize("args, kwargs, message", [
    ([{"ref": "act"}, "dim"], {}, "argument 'dim' must be a list of int"),
    ([{"ref": "act"}, [1], "yes"], {}, "argument 'keepdim' must be bool"),
    ([{"ref": "act"}, [1]], {"dtype": "float32"}, "argument 'dtype' must be ScalarType"),
    ([{"ref": "act"}, [1]], {"dtype": {"dtype": "object"}}, "is not a program value"),
    ([[{"ref": "act"}], [1]], {}, "argument 'self' must be Tensor"),
    ([], {}, "needs argument 'self'"),
    ([{"ref": "act"}, [1], False, None, 5], {}, "takes at most 3 positional arguments, got 5"),
    ([{"ref": "act"}, [1]], {"self": {"ref": "act"}}, "argument 'self' is given twice"),
])
def test_arguments_are_checked_against_the_schema(args, kwargs, message):
    graph = _with_node(_node("aten.sum.dim_IntList", *args, **kwargs))
    with pytest.raises(FormatError, match=message):
        _read(graph)


@pytest.mark.parametrize("target, key, value", [
    ("aten.gelu.default", "approximate", "erf; rm -rf /"),
    ("aten.div.Tensor_mode", "rounding_mode", "ceil"),
])
def test_a_string_outside_its_enumeration_is_refused(target, key, value):
    graph = _with_node(_node(target, {"ref": "act"}, *([{"ref": "act"}] if "div" in target
                                                        else []), **{key: value}))
    with pytest.raises(FormatError, match=f"argument '{key}' is '.*', not one of"):
        _read(graph)


def test_enumerated_strings_pass():
    graph = _with_node(_node("aten.div.Tensor_mode", {"ref": "act"}, 2.0,
                             rounding_mode="floor"), output="extra")
    assert _read(graph).nodes[-1].kwargs == (("rounding_mode", "floor"),)


def test_a_reference_before_its_definition_is_refused():
    graph = _base()
    graph["nodes"][0]["args"][0] = {"ref": "act"}
    with pytest.raises(FormatError, match=r"node 0 \(mm\): it refers to 'act' before "
                                          "defining it"):
        _read(graph)


def test_a_name_defined_twice_is_refused():
    graph = _base()
    graph["nodes"][1]["name"] = "x"
    with pytest.raises(FormatError, match="the name 'x' is defined twice"):
        _read(graph)


@pytest.mark.parametrize("output, error, message", [
    ({"kind": "output", "value": {"ref": "nothing"}}, FormatError, "before defining it"),
    ({"kind": "output", "value": 3}, FormatError, "must be a reference to a tensor"),
    ({"kind": "print", "value": {"ref": "act"}}, FormatError, "output kind 'print'"),
    ({"kind": "buffer_mutation", "target": "w", "value": {"ref": "act"}}, UnsafeContentError,
     "target 'w' is not a buffer input"),
])
def test_bad_output_bindings_are_refused(output, error, message):
    graph = _base()
    graph["outputs"].append(output)
    with pytest.raises(error, match=message):
        _read(graph)


def test_an_output_that_is_not_a_tensor_is_refused():
    graph = _with_node(_node("aten.sym_size.int", {"ref": "x"}, 0), output="extra")
    with pytest.raises(FormatError, match="output 'extra' is not a tensor"):
        _read(graph)


def test_buffer_updates_only_in_train_programs():
    graph = _with_node(_node("aten.add_.Tensor", {"ref": "b_count"}, 1))
    graph["outputs"].append({"kind": "buffer_mutation", "target": "count",
                             "value": {"ref": "extra"}})
    assert _read(graph, train=True).outputs[1].target == "count"
    with pytest.raises(UnsafeContentError, match="updates buffer 'b_count' in an eval program"):
        _read(graph, train=False)


@pytest.mark.parametrize("chain", [
    [_node("aten.add_.Tensor", {"ref": "p_w"}, 1)],
    [_node("aten.view.default", {"ref": "p_w"}, [-1], name="flat"),
     _node("aten.mul_.Scalar", {"ref": "flat"}, 0)],
    [_node("aten.t.default", {"ref": "x"}, name="xt"),
     _node("aten.copy_.default", {"ref": "xt"}, {"ref": "act"})],
])
def test_in_place_updates_of_parameters_and_inputs_are_refused(chain):
    graph = _base()
    graph["nodes"] += chain
    with pytest.raises(UnsafeContentError, match="a program may update only buffers"):
        _read(graph)


def test_in_place_updates_of_tensors_the_program_made_are_allowed():
    graph = _with_node(_node("aten.masked_fill_.Scalar", {"ref": "mm"}, {"ref": "act"}, 0.0))
    assert _read(graph, train=False).nodes[-1].target == "aten.masked_fill_.Scalar"


def test_batch_norm_updates_statistics_only_when_training():
    bn = _node("aten.batch_norm.default", {"ref": "x"}, None, None, {"ref": "p_w"},
               {"ref": "p_w"}, False, 0.1, 1e-5, False)
    _read(_with_node(bn), train=False)  # inference: nothing is written
    bn["args"][5] = True
    with pytest.raises(UnsafeContentError, match="updates parameter 'p_w' in place"):
        _read(_with_node(bn))


@pytest.mark.parametrize("node", [
    _node("aten.full.default", [1000000, 1000000], 0.0),
    _node("aten.zeros.default", [10**12]),
    _node("aten.ones.default", [10**6, 10**6]),
    _node("aten.arange.default", 10**12),
    _node("aten.arange.start_step", 0, 10**13, 10),
    _node("aten.linspace.default", 0, 1, 10**12),
    _node("aten.eye.m", 10**7, 10**7),
    _node("aten.expand.default", {"ref": "x"}, [10**7, 10**7]),
])
def test_huge_literal_allocations_are_refused_before_running(node):
    with pytest.raises(FormatError, match="elements, over the limit of 4294967296"):
        _read(_with_node(node))


def test_integers_beyond_64_bits_are_refused():
    with pytest.raises(FormatError, match="does not fit in 64 bits"):
        _read(_with_node(_node("aten.zeros.default", [2**63])))


def test_a_million_nodes_are_refused():
    node = '{"name":"n%d","target":"aten.relu.default","args":[{"ref":"x"}],"kwargs":{}}'
    nodes = ",".join(node % i for i in range(1_000_000))
    data = (b'{"format":"graft.graph/1","inputs":[{"name":"x","kind":"input"}],"nodes":['
            + nodes.encode() + b'],"outputs":[{"kind":"output","value":{"ref":"x"}}]}')
    with pytest.raises(FormatError, match="over the limit of"):
        read_graph(data, name="big.json")


def test_more_nodes_than_the_limit_are_refused(monkeypatch):
    monkeypatch.setattr(g, "MAX_NODES", 10)
    graph = _base()
    graph["nodes"] += [_node("aten.relu.default", {"ref": "x"}, name=f"r{i}") for i in range(9)]
    with pytest.raises(FormatError, match="'nodes' has 11 entries, over the limit of 10"):
        _read(graph)


@pytest.mark.parametrize("found, message", [
    ("graft.graph/2", "written by a newer Graft: upgrade Graft"),
    ("torch.export/1", "this Graft reads 'graft.graph/1'"),
])
def test_other_formats_are_refused_with_what_to_do(found, message):
    graph = _base()
    graph["format"] = found
    with pytest.raises(FormatError, match=message):
        _read(graph)


@pytest.mark.parametrize("change", [
    lambda d: d.update(code="import os"),
    lambda d: d["inputs"][0].update(extra=1),
    lambda d: d["nodes"][0].update(meta={}),
    lambda d: d["inputs"][0].pop("target"),
    lambda d: d["inputs"][2].update(target="w"),
    lambda d: d["inputs"][0].update(kind="module"),
    lambda d: d["inputs"][0].update(target="../../etc/passwd"),
    lambda d: d.update(outputs=[]),
    lambda d: d.update(nodes={}),
])
def test_structure_is_checked_exactly(change):
    graph = _base()
    change(graph)
    with pytest.raises(FormatError):
        _read(graph)


def test_json_that_is_not_strict_is_refused():
    data = json.dumps(_base()).replace('"kwargs": {}', '"kwargs": {}, "kwargs": {}', 1)
    with pytest.raises(FormatError, match="appears twice"):
        read_graph(data.encode(), name="p.json")
    with pytest.raises(FormatError, match="not a JSON number"):
        read_graph(json.dumps(_with_node(_node("aten.mul.Tensor", {"ref": "act"},
                                               float("nan")))).encode(), name="p.json")


def test_tags_and_special_floats_decode_to_data():
    graph = _with_node(_node("aten.full.default", [2, 2], {"float": "-inf"},
                             dtype={"dtype": "float16"}, device={"device": "cpu"}),
                       output="extra")
    node = _read(graph).nodes[-1]
    assert node.args[1] == float("-inf")
    assert dict(node.kwargs) == {"dtype": Tag("dtype", "float16"), "device": Tag("device", "cpu")}


def test_the_text_for_people_uses_only_graft_names():
    graph = _base()
    graph["inputs"][2]["name"] = "images"
    graph["nodes"][0]["args"][0] = {"ref": "images"}
    text = graph_text(graph_from_json(copy.deepcopy(graph), name="p"))
    assert text.splitlines()[0] == "def program(in2):"
    assert "n0 = torch.ops.aten.mm.default(in2, in0)  # 'mm'" in text
    assert "# in0 = parameter('w')  # 'p_w'" in text
    assert "return (n1,)" in text


def test_the_reader_imports_no_torch_and_exports_its_public_names(tmp_path):
    import subprocess
    import sys

    from tests.conftest import env_with_src

    code = ("import sys, graft.format.graph as g, graft.format.validate; "
            "g.read_graph(open(sys.argv[1], 'rb').read(), name='p'); print('torch' in sys.modules)")
    path = tmp_path / "program.json"
    path.write_text(json.dumps(_base()))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, env=env_with_src(), check=True)
    assert out.stdout.strip() == "False"
    from graft.format import operators

    for module in (g, operators):
        assert module.__all__ == sorted(module.__all__)
        public = {k for k, v in vars(module).items() if not k.startswith("_")
                  and getattr(v, "__module__", None) == module.__name__}
        assert public <= set(module.__all__)
