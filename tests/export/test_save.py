"""graft.save on models as users write them: tied weights, keyword inputs, nested outputs,
eval-only modules, narrowed dimensions, data-dependent branches, and the fidelity check."""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graft
from graft.errors import FormatError, NotTrainable, SaveWarning

EXACT = {"rtol": 0.0, "atol": 0.0}


class TiedLM(nn.Module):
    """A tiny language model whose output head is the input embedding (as GPT-2, BERT...)."""

    def __init__(self, vocab: int = 30, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(0.2))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # one Parameter, two names
        self.register_buffer("scale", torch.tensor(0.5))
        self.register_buffer("scale_alias", self.scale)  # a shared buffer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)) * self.scale)  # (B, T, V)


def _ids(batch: int = 3, seq: int = 5) -> torch.Tensor:
    return torch.randint(0, 30, (batch, seq), generator=torch.Generator().manual_seed(batch))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    graft.save(model, tmp_path / "m", name="tied", version="1",
               inputs={"ids": "int64[batch,seq]"}, example_inputs=(_ids(),))
    manifest = json.loads((tmp_path / "m/graft.json").read_text())
    assert manifest["aliases"] == {"head.weight": "embed.weight", "scale_alias": "scale"}
    assert "head.weight" not in manifest["tensors"]
    loaded = graft.load(tmp_path / "m", trainable=True)
    assert loaded.weights.head.weight is loaded.weights.embed.weight
    assert loaded.weights.scale_alias is loaded.weights.scale
    assert {k.removeprefix("weights.") for k in loaded.state_dict()} == set(model.state_dict())
    assert len(list(loaded.parameters())) == len(list(model.parameters()))


def test_tied_lm_head_fine_tunes_bit_identically_to_eager(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    graft.save(model, tmp_path / "m", name="tied", version="1",
               inputs={"ids": "int64[batch,seq]"}, example_inputs=(_ids(),))
    reference = copy.deepcopy(model)
    loaded = graft.load(tmp_path / "m", trainable=True)
    reference.train()
    loaded.train()
    opt_ref = torch.optim.Adam(reference.parameters(), lr=0.05)
    opt = torch.optim.Adam(loaded.parameters(), lr=0.05)
    for step in range(4):
        ids = _ids(2 + step, 4 + step)
        targets = torch.roll(ids, 1, dims=1)
        for net, optim in ((reference, opt_ref), (loaded, opt)):
            torch.manual_seed(100 + step)  # the same dropout masks on both sides
            logits = net(ids)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optim.zero_grad()
            loss.backward()
            optim.step()
    params = dict(loaded.weights.named_parameters(remove_duplicate=False))
    for name, p in reference.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(params[name], p, **EXACT, msg=name)
    # Trained through the head's name, the embedding moved with it, as in the source.
    assert torch.equal(loaded.weights.head.weight, reference.embed.weight)
    reference.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(_ids(4, 6)), reference(_ids(4, 6)), **EXACT)


class CacheFirst(nn.Module):
    """GPT-2-style: ``attention_mask`` comes after a cache argument, so users pass it by name."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)

    def forward(self, input_ids: torch.Tensor, past_key_values: object = None,
                attention_mask: torch.Tensor | None = None, *, scale: float = 1.0,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        assert past_key_values is None
        x = self.embed(input_ids) * attention_mask.unsqueeze(-1) * scale  # (B, T, 8)
        return x if shift is None else x + shift


def test_keyword_inputs_are_named_after_their_keywords(tmp_path):
    model = CacheFirst().eval()
    ids, mask, shift = _ids(2, 4), torch.ones(2, 4, dtype=torch.long), torch.randn(8)
    mask[1, -1] = 0
    graft.save(model, tmp_path / "m", name="kw", version="1", example_inputs=(ids,),
               example_kwargs={"attention_mask": mask, "scale": 3.0, "shift": shift},
               inputs={"input_ids": "int64[batch,seq]", "attention_mask": "int64[batch,seq]",
                       "shift": "float32[8]"})
    loaded = graft.load(tmp_path / "m")
    spec = loaded.manifest.signatures["forward"]
    assert list(spec.inputs) == ["input_ids", "attention_mask", "shift"]
    other, other_mask = _ids(3, 6), torch.ones(3, 6, dtype=torch.long)
    want = model(other, attention_mask=other_mask, scale=3.0, shift=shift)
    torch.testing.assert_close(loaded(other, attention_mask=other_mask, shift=shift), want,
                               **EXACT)
    torch.testing.assert_close(loaded(input_ids=other, attention_mask=other_mask, shift=shift),
                               want, **EXACT)


def test_explicit_signature_takes_example_kwargs(tmp_path):
    model = CacheFirst().eval()
    ids, mask = _ids(2, 4), torch.ones(2, 4, dtype=torch.long)
    graft.save(model, tmp_path / "m", name="kw", version="1", signatures={
        "embed": graft.Signature("forward", example_inputs=(ids,),
                                 example_kwargs={"attention_mask": mask})})
    loaded = graft.load(tmp_path / "m")
    assert list(loaded.manifest.signatures["embed"].inputs) == ["input_ids", "attention_mask"]
    torch.testing.assert_close(loaded(ids, attention_mask=mask),
                               model(ids, attention_mask=mask), **EXACT)


def test_keyword_examples_must_be_tensors_or_configuration(tmp_path):
    with pytest.raises(FormatError, match="example keyword 'past_key_values'"):
        graft.save(CacheFirst(), tmp_path / "m", name="kw", version="1",
                   example_inputs=(_ids(),), example_kwargs={"past_key_values": [object()]})
    assert not (tmp_path / "m").exists()


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict:
        h1 = self.a(x)
        h2 = torch.relu(h1)
        return {"logits": self.b(h2), "hidden_states": (h1, h2), "extra": [x.sum(-1), None]}


def test_nested_outputs_come_back_in_the_same_structure(tmp_path):
    model = Nested().eval()
    x = torch.randn(3, 4)
    graft.save(model, tmp_path / "m", name="nested", version="1", example_inputs=(x,))
    loaded = graft.load(tmp_path / "m")
    spec = loaded.manifest.signatures["forward"]
    assert list(spec.outputs) == ["logits", "hidden_states.0", "hidden_states.1", "extra.0"]
    x5 = torch.randn(5, 4)
    out, want = loaded(x5), model(x5)
    assert type(out) is dict and list(out) == ["logits", "hidden_states", "extra"]
    assert type(out["hidden_states"]) is tuple and type(out["extra"]) is list
    assert out["extra"][1] is None
    torch.testing.assert_close(out["logits"], want["logits"], **EXACT)
    for got, ref in zip(out["hidden_states"], want["hidden_states"]):
        torch.testing.assert_close(got, ref, **EXACT)
    torch.testing.assert_close(out["extra"][0], want["extra"][0], **EXACT)


def test_user_names_outputs_and_model_outputs_read_as_records(tmp_path):
    from transformers.utils import ModelOutput

    from dataclasses import dataclass

    @dataclass
    class Out(ModelOutput):
        logits: torch.Tensor | None = None
        hidden_states: tuple | None = None

    class Model(Nested):
        def forward(self, x: torch.Tensor) -> Out:
            h = self.a(x)
            return Out(logits=self.b(h), hidden_states=(x, h))

    model = Model().eval()
    x = torch.randn(3, 4)
    graft.save(model, tmp_path / "m", name="rec", version="1", example_inputs=(x,),
               signatures={"forward": graft.Signature(outputs=["scores", "h0", "h1"])})
    loaded = graft.load(tmp_path / "m")
    assert list(loaded.manifest.signatures["forward"].outputs) == ["scores", "h0", "h1"]
    out, want = loaded(x), model(x)
    torch.testing.assert_close(out.logits, want.logits, **EXACT)
    torch.testing.assert_close(out[0], want[0], **EXACT)
    torch.testing.assert_close(out["hidden_states"][1], want.hidden_states[1], **EXACT)
    assert list(out.keys()) == list(want.keys()) and len(out.to_tuple()) == 2
    with pytest.raises(AttributeError, match="no field 'loss'"):
        out.loss
    with pytest.raises(FormatError, match="names 2 outputs but forward returns 3"):
        graft.save(model, tmp_path / "n", name="rec", version="1", example_inputs=(x,),
                   signatures={"forward": graft.Signature(outputs=["a", "b"])})


class NumpyMasks(nn.Module):
    """Draws a random mask with NumPy in training (as wav2vec2 does): train cannot export."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            keep = np.random.default_rng(0).random(x.shape[0]) > 0.5
            x = x[torch.from_numpy(keep)]
        return self.proj(x)


def test_a_model_whose_train_mode_cannot_export_is_saved_eval_only(tmp_path):
    model = NumpyMasks().eval()
    x = torch.randn(3, 4)
    with pytest.warns(SaveWarning, match="saved eval-only .*cannot be exported in train mode"):
        graft.save(model, tmp_path / "m", name="np", version="1", example_inputs=(x,))
    manifest = json.loads((tmp_path / "m/graft.json").read_text())
    assert "train mode" in manifest["fine_tuning"]["eval_only"]
    assert manifest["signatures"]["forward"]["programs"] == {"eval": "programs/forward.eval.json"}
    loaded = graft.load(tmp_path / "m")
    torch.testing.assert_close(loaded(x), model(x), **EXACT)
    with pytest.raises(NotTrainable, match="cannot be fine-tuned: it was saved eval-only"):
        graft.load(tmp_path / "m", trainable=True)
    with pytest.raises(FormatError, match="trainable=True, but"):
        graft.save(model, tmp_path / "t", name="np", version="1", example_inputs=(x,),
                   trainable=True)
    assert not (tmp_path / "t").exists()


def test_variants_eval_asks_for_an_eval_only_module_without_a_warning(tiny_cnn, images,
                                                                      tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaveWarning)
        graft.save(tiny_cnn, tmp_path / "m", name="cnn", version="1", example_inputs=(images,),
                   variants=("eval",))
    manifest = json.loads((tmp_path / "m/graft.json").read_text())
    assert manifest["fine_tuning"]["eval_only"] == "it was saved with variants=('eval',)"
    with pytest.raises(NotTrainable, match=r"variants=\('eval',\)"):
        graft.load(tmp_path / "m", trainable=True)
    with pytest.raises(FormatError, match="variants=.*unknown"):
        graft.save(tiny_cnn, tmp_path / "n", name="cnn", version="1",
                   example_inputs=(images,), variants=("eval", "fast"))
    with pytest.raises(FormatError, match="train mode"):
        graft.save(NumpyMasks(), tmp_path / "o", name="np", version="1",
                   example_inputs=(torch.randn(3, 4),), variants=("eval", "train"))


class Narrowing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            return x * 2
        return x + 1


def test_a_shape_branch_that_narrows_a_dimension_is_reported(tmp_path):
    line = inspect.getsourcelines(Narrowing.forward)[1] + 1
    with pytest.warns(SaveWarning) as record:
        graft.save(Narrowing(), tmp_path / "m", name="narrow", version="1",
                   example_inputs=(torch.randn(3, 5),))
    messages = [str(w.message) for w in record if issubclass(w.category, SaveWarning)]
    assert len(messages) == 1, messages
    assert "takes 'batch' from 1 to 4 only" in messages[0]
    assert f"test_save.py:{line} in forward" in messages[0]
    loaded = graft.load(tmp_path / "m")
    torch.testing.assert_close(loaded(torch.ones(4, 5)), torch.full((4, 5), 2.0))
    with pytest.raises(graft.SignatureError, match="'batch' is 5, but this signature takes 1 to 4"):
        loaded(torch.ones(5, 5))


class DataBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_a_data_dependent_branch_is_refused_naming_the_line(tmp_path):
    line = inspect.getsourcelines(DataBranch.forward)[1] + 1
    with pytest.raises(FormatError) as info:
        graft.save(DataBranch(), tmp_path / "m", name="data", version="1",
                   example_inputs=(torch.randn(3, 5),))
    message = str(info.value)
    assert "branches on the values of a tensor" in message
    assert f"test_save.py:{line} in forward: `if x.sum() > 0:`" in message
    assert len(message) < 600 and "site-packages/torch" not in message
    assert info.value.__cause__ is None  # no torch dump chained under it
    assert not (tmp_path / "m").exists()


_TICKS = itertools.count(1)


class Counter(nn.Module):
    """Depends on Python state torch.export cannot capture: a global that each call advances.

    (torch.export restores the module's own attributes after tracing, so the state lives
    outside it, as a cache or a global would.)
    """

    def __init__(self, in_train: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.in_train = in_train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tick = next(_TICKS)
        if self.training or not self.in_train:
            return self.lin(x) * tick
        return self.lin(x)


@pytest.mark.parametrize("in_train", [False, True], ids=["eval", "train"])
def test_a_program_that_differs_from_eager_is_refused(in_train, tmp_path):
    variant = "train" if in_train else "eval"
    with pytest.raises(FormatError, match=f"exported {variant} program's output 'output' "
                                          "differs from the eager model's"):
        graft.save(Counter(in_train), tmp_path / "m", name="c", version="1",
                   example_inputs=(torch.randn(2, 3),))
    assert not (tmp_path / "m").exists()


class _Scaled(torch.autograd.Function):
    """y = 2x with a hand-written backward that is off by ``error`` (relative)."""

    error = 0.0

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205 - autograd.Function protocol
        return x * 2

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * (2 * (1 + _Scaled.error))


class OwnBackward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Scaled.apply(self.lin(x))


@pytest.mark.parametrize("error, outcome", [(1e-7, "close"), (0.5, "refused")])
def test_a_hand_written_backward_is_checked_to_rounding_and_reported(error, outcome,
                                                                     tmp_path, monkeypatch):
    monkeypatch.setattr(_Scaled, "error", error)
    x = torch.randn(4, 3)
    if outcome == "refused":
        with pytest.raises(FormatError, match="train program's gradient of 'lin.weight'"):
            graft.save(OwnBackward(), tmp_path / "m", name="own", version="1",
                       example_inputs=(x,))
        return
    with pytest.warns(SaveWarning, match=r"defines its own backward \(_ScaledBackward\)"):
        graft.save(OwnBackward(), tmp_path / "m", name="own", version="1", example_inputs=(x,))
    manifest = json.loads((tmp_path / "m/graft.json").read_text())
    assert "train" in manifest["signatures"]["forward"]["programs"]


def test_parameters_the_source_does_not_train_stay_frozen(tmp_path):
    model = TiedLM()
    model.body[0].bias.requires_grad_(False)  # as Marian's sinusoidal position table
    graft.save(model, tmp_path / "m", name="frozen", version="1",
               inputs={"ids": "int64[batch,seq]"}, example_inputs=(_ids(),))
    manifest = json.loads((tmp_path / "m/graft.json").read_text())
    assert manifest["fine_tuning"]["frozen"] == ["body.0.bias"]
    loaded = graft.load(tmp_path / "m", trainable=True)
    grads = {n: p.requires_grad for n, p in loaded.weights.named_parameters()}
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
