"""A loaded module computes exactly what its source model computes, in eval and train mode."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import graft
from tests.conftest import token_batch

EXACT = {"rtol": 0.0, "atol": 0.0}


def _save_cnn(model: nn.Module, path: Path, images: torch.Tensor) -> graft.Module:
    graft.save(model, path, name="tiny-cnn", version="1.0.0", signatures={
        "classify": graft.Signature("forward", example_inputs=(images,)),
        "features": graft.Signature("features", example_inputs=(images,)),
    })
    return graft.load(path, trainable=True)


def test_eval_outputs_equal_source_for_any_batch(tiny_cnn, images, tmp_path):
    loaded = _save_cnn(tiny_cnn, tmp_path / "m", images)
    tiny_cnn.eval()
    loaded.eval()
    for batch in (1, 4, 9):
        x = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(loaded(x), tiny_cnn(x), **EXACT)
        torch.testing.assert_close(loaded.signature("features")(x), tiny_cnn.features(x), **EXACT)


def test_train_step_matches_source_bit_for_bit(tiny_cnn, images, tmp_path):
    reference = copy.deepcopy(tiny_cnn)
    loaded = _save_cnn(tiny_cnn, tmp_path / "m", images)
    reference.train()
    loaded.train()
    labels = torch.tensor([0, 1, 2, 3])

    torch.manual_seed(7)
    ref_loss = nn.functional.cross_entropy(reference(images), labels)
    ref_loss.backward()
    torch.manual_seed(7)
    loss = nn.functional.cross_entropy(loaded(images), labels)
    loss.backward()

    torch.testing.assert_close(loss, ref_loss, **EXACT)
    params = dict(loaded.weights.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, **EXACT, msg=name)
    buffers = dict(loaded.weights.named_buffers())
    for name, b in reference.named_buffers():
        torch.testing.assert_close(buffers[name], b, **EXACT, msg=name)
    assert int(buffers["bn1.num_batches_tracked"]) == 1


def test_transformer_eval_train_and_grads_match(tiny_transformer, tmp_path):
    ids, mask = token_batch(3, 7)
    reference = copy.deepcopy(tiny_transformer)
    graft.save(tiny_transformer, tmp_path / "t", name="tiny-tf", version="1.0.0", signatures={
        "embed": graft.Signature("forward", inputs={"input_ids": "int64[batch,seq]",
                                                    "attention_mask": "int64[batch,seq]"},
                                 example_inputs=(ids, mask)),
        "tokens": graft.Signature("token_states", inputs={"input_ids": "int64[batch,seq]",
                                                          "attention_mask": "int64[batch,seq]"},
                                  example_inputs=(ids, mask)),
    })
    loaded = graft.load(tmp_path / "t", trainable=True)
    assert str(loaded.signatures["tokens"].spec.outputs["output"]) == "float32[batch,seq,16]"

    reference.eval()
    loaded.eval()
    other_ids, other_mask = token_batch(5, 11)
    torch.testing.assert_close(loaded(other_ids, other_mask), reference(other_ids, other_mask),
                               **EXACT)

    reference.train()
    loaded.train()
    torch.manual_seed(3)
    ref = reference(other_ids, other_mask)
    ref.square().sum().backward()
    torch.manual_seed(3)
    out = loaded(input_ids=other_ids, attention_mask=other_mask)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, **EXACT)
    grads = {n: p.grad for n, p in loaded.weights.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **EXACT, msg=name)


def test_signatures_share_one_set_of_weights(tiny_cnn, images, tmp_path):
    loaded = _save_cnn(tiny_cnn, tmp_path / "m", images)
    loaded.eval()
    before = loaded(images).detach().clone()
    # Fine-tune through `features` only: `classify` must change too.
    head = nn.Linear(8, 2)
    model = nn.Sequential(loaded.signature("features"), head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    assert {id(p) for p in loaded.parameters()} <= {id(p) for p in model.parameters()}
    model.train()
    loss = model(images).square().mean()
    loss.backward()
    optimizer.step()
    loaded.eval()
    assert not torch.equal(loaded(images), before)


def test_frozen_module_never_changes(tiny_cnn, images, tmp_path):
    graft.save(tiny_cnn, tmp_path / "m", name="tiny-cnn", version="1.0.0",
               example_inputs=(images,))
    frozen = graft.load(tmp_path / "m")
    assert not any(p.requires_grad for p in frozen.parameters())
    snapshot = {k: v.clone() for k, v in frozen.state_dict().items()}
    model = nn.Sequential(frozen, nn.Linear(4, 2))
    model.train()  # a frozen module stays in inference behaviour inside a training model
    out1, out2 = model(images), model(images)
    torch.testing.assert_close(out1, out2, **EXACT)  # no dropout
    for k, v in frozen.state_dict().items():
        torch.testing.assert_close(v, snapshot[k], **EXACT)  # no batch-norm update


def test_module_is_eager_and_hookable(tiny_cnn, images, tmp_path):
    loaded = _save_cnn(tiny_cnn, tmp_path / "m", images)
    seen = []
    loaded.signature("features").register_forward_hook(lambda m, i, o: seen.append(o.shape))
    loaded.signature("features")(images)
    assert seen == [torch.Size([4, 8])]
    code = loaded.program_code("classify", "train")
    assert "torch.ops.aten.batch_norm" in code and "p_conv1_weight" in code


def test_state_dict_uses_source_names(tiny_cnn, images, tmp_path):
    loaded = _save_cnn(tiny_cnn, tmp_path / "m", images)
    names = {k.removeprefix("weights.") for k in loaded.state_dict()}
    assert names == set(tiny_cnn.state_dict())


def test_size_guards_become_checked_dimension_bounds(images, tmp_path):
    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            if ids.shape[0] > 3:  # traced with batch 4: valid only for batch >= 4
                return self.table[: ids.shape[1]] * 2
            return self.table[: ids.shape[1]]

    graft.save(Guarded(), tmp_path / "g", name="g", version="1", signatures={
        "forward": graft.Signature(inputs={"ids": "int64[batch,seq]"},
                                   example_inputs=(torch.zeros(4, 5, dtype=torch.int64),))})
    loaded = graft.load(tmp_path / "g")
    assert loaded.signatures["forward"].spec.dims == {"batch": (4, None), "seq": (1, 10)}
    loaded(torch.zeros(6, 10, dtype=torch.int64))
    with pytest.raises(graft.SignatureError, match="'batch' is 2, but this signature takes 4"):
        loaded(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(graft.SignatureError, match="truncate the input to 10"):
        loaded(torch.zeros(4, 11, dtype=torch.int64))


def test_a_batch_of_one_example_still_exports_a_dynamic_batch(tiny_cnn, tmp_path):
    graft.save(tiny_cnn, tmp_path / "m", name="m", version="1",
               example_inputs=(torch.randn(1, 3, 16, 16),))
    loaded = graft.load(tmp_path / "m")
    tiny_cnn.eval()
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(loaded(x), tiny_cnn(x), rtol=0, atol=0)


def test_tensors_a_program_creates_follow_the_module_device(tmp_path):
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)  # (T,)
            return x * self.scale + positions

    graft.save(Positions(), tmp_path / "p", name="p", version="1",
               signatures={"forward": graft.Signature(inputs={"x": "float32[batch,seq]"})})
    loaded = graft.load(tmp_path / "p")
    assert '{"device":"cpu"}' in (tmp_path / "p/programs/forward.eval.json").read_text()
    torch.testing.assert_close(loaded(torch.zeros(2, 3)), torch.arange(3.0).expand(2, 3))
    loaded.to("meta")  # stands in for a GPU here: the program must not create CPU tensors
    out = loaded(torch.zeros(2, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3)


def test_fine_tuning_with_frozen_batch_norm(tiny_cnn, images, tmp_path):
    reference = copy.deepcopy(tiny_cnn)
    loaded = _save_cnn(tiny_cnn, tmp_path / "m", images)
    assert "train_frozen_bn" in loaded.signatures["classify"].spec.programs
    frozen = graft.load(tmp_path / "m", trainable=True, batch_norm="frozen")
    stats = {k: v.clone() for k, v in frozen.weights.named_buffers()}
    reference.train()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()  # the Keras recipe: batch norm in inference mode, dropout on
    frozen.train()
    torch.manual_seed(11)
    ref = reference(images)
    ref.sum().backward()
    torch.manual_seed(11)
    out = frozen(images)
    out.sum().backward()
    torch.testing.assert_close(out, ref, **EXACT)
    grads = {n: p.grad for n, p in frozen.weights.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **EXACT, msg=name)
    for name, value in frozen.weights.named_buffers():
        torch.testing.assert_close(value, stats[name], **EXACT, msg=name)  # nothing updated
    torch.manual_seed(11)
    assert not torch.equal(frozen(images), frozen(images))  # dropout is on
    with pytest.raises(graft.SignatureError, match="batch_norm='sometimes'"):
        graft.load(tmp_path / "m", trainable=True, batch_norm="sometimes")
