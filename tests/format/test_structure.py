"""Output structures, tensor aliases and eval-only policies in the manifest are validated."""

from __future__ import annotations

import pytest

from graft.errors import FormatError
from graft.format.entries import FileEntry, FineTuning, TensorEntry
from graft.format.manifest import Manifest
from graft.format.spec import SignatureSpec
from graft.format.structure import MAX_DEPTH, check_structure, structure_leaves

OUTS = ["logits", "hidden_states.0", "hidden_states.1"]
GOOD = {"record": [["logits", "logits"],
                   ["hidden_states", {"tuple": ["hidden_states.0", "hidden_states.1"]}],
                   ["attentions", None]]}


def test_a_valid_structure_lists_its_leaves_in_order():
    assert check_structure(GOOD, OUTS) is GOOD
    assert structure_leaves(GOOD) == OUTS
    assert structure_leaves({"list": [None, "x"]}) == ["x"]


@pytest.mark.parametrize("tree, match", [
    ({"tuple": ["logits", "logits", "hidden_states.0"]}, "exactly once"),
    ({"tuple": ["logits"]}, "exactly once"),
    ({"set": ["logits"]}, "is not one of"),
    ({"tuple": "logits"}, "over a list"),
    ({"tuple": [], "list": []}, "is not an output name"),
    (7, "is not an output name"),
    ({"dict": [["a", "logits"], ["a", "hidden_states.0"]]}, "twice"),
    ({"dict": [["bad key\n", "logits"]]}, "must be"),
    ({"dict": [["a", "b", "c"]]}, "must be"),
])
def test_malformed_structures_are_refused(tree, match):
    with pytest.raises(FormatError, match=match):
        check_structure(tree, OUTS)


def test_deep_nesting_is_refused_before_recursing_without_bound():
    tree: object = "logits"
    for _ in range(MAX_DEPTH + 5):
        tree = {"tuple": [tree]}
    with pytest.raises(FormatError, match="deeper than"):
        check_structure(tree, ["logits"])


def test_signature_spec_round_trips_its_structure_and_dotted_outputs():
    spec = SignatureSpec({"x": "float32[batch,4]"}, {k: "float32[batch,4]" for k in OUTS},
                         {"eval": "programs/f.eval.json"}, structure=GOOD)
    again = SignatureSpec.from_json(spec.to_json())
    assert again.structure == GOOD and list(again.outputs) == OUTS
    with pytest.raises(FormatError, match="not an identifier"):
        SignatureSpec({"x.y": "float32[4]"}, {"y": "float32[4]"}, {"eval": "programs/p.json"})
    with pytest.raises(FormatError, match="not an identifier"):
        SignatureSpec({"x": "float32[4]"}, {"y.": "float32[4]"}, {"eval": "programs/p.json"})


def _manifest(**fields: object) -> dict:
    spec = SignatureSpec({"x": "float32[4]"}, {"y": "float32[4]"},
                         {"eval": "programs/p.json"})
    data = Manifest(name="m", version="1", signatures={"f": spec}, default_signature="f",
                    files={"programs/p.json": FileEntry("0" * 64, 1)},
                    tensors={"embed.weight": TensorEntry("parameter", "float32", (4,),
                                                         "0" * 64)}).to_json()
    data.update(fields)
    return data


def test_aliases_must_name_stored_tensors():
    manifest = Manifest.from_json(_manifest(aliases={"head.weight": "embed.weight"}))
    assert manifest.aliases == {"head.weight": "embed.weight"}
    assert Manifest.from_json(manifest.to_json()).digest == manifest.digest
    for aliases, match in [({"head.weight": "nothing"}, "not a stored tensor"),
                           ({"embed.weight": "embed.weight"}, "also a stored tensor"),
                           ({"head..weight": "embed.weight"}, "dotted tensor name"),
                           (["head.weight"], "must be an object")]:
        with pytest.raises(FormatError, match=match):
            Manifest.from_json(_manifest(aliases=aliases))


def test_no_aliases_leaves_the_canonical_form_unchanged():
    plain = Manifest.from_json(_manifest())
    assert "aliases" not in plain.to_json()
    assert Manifest.from_json(_manifest(aliases={})).digest == plain.digest


def test_eval_only_is_a_reason_and_excludes_trainable_by_default():
    fine = {"trainable": False, "batch_norm": "update", "eval_only": "train mode draws masks"}
    manifest = Manifest.from_json(_manifest(fine_tuning=fine))
    assert manifest.fine_tuning.eval_only == "train mode draws masks"
    with pytest.raises(FormatError, match="cannot be trainable"):
        FineTuning(trainable=True, eval_only="no train program")
    with pytest.raises(FormatError, match="eval_only must be a string"):
        Manifest.from_json(_manifest(fine_tuning={**fine, "eval_only": 3}))
