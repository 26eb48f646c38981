"""A corpus of real ``transformers`` architectures, built tiny from random configs.

Each entry is what a new user would hand to ``graft.save``: the model (from a config class,
no downloads, deterministic init), the plainest call that feeds it (``model(input_ids,
attention_mask=mask)``), and which input dimensions may vary. The corpus is shared by the
export tests (does the plainest ``graft.save`` work, and does the reloaded module match
eager?) and by the operator list (which ATen operators do real models need?).

Sizes are kept tiny (hidden 32, 2 layers) so building and exporting the whole corpus takes
minutes on two cores.

Usage::

    from tests.export.corpus import ENTRIES
    for entry in ENTRIES:
        model = entry.build()
        out = model(*entry.args, **entry.kwargs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["CorpusEntry", "ENTRIES", "by_name"]

BATCH, SEQ, VOCAB, HIDDEN = 2, 8, 99, 32


@dataclass(frozen=True)
class CorpusEntry:
    """One architecture of the corpus.

    Args:
        name: Short unique name (``"bert"``, ``"gpt2-lm"``).
        build: Returns a freshly initialised model in eval mode (same weights every call).
        args: Example positional inputs.
        kwargs: Example keyword inputs (the rest of the plainest call).
        dynamic: Input name -> {axis: dimension name} for dimensions the model allows to
            vary (``{"input_ids": {0: "batch", 1: "seq"}}``); names are shared across inputs.
        family: ``"encoder"``, ``"decoder"``, ``"encoder-decoder"``, ``"vision"`` or
            ``"audio"``.
    """

    name: str
    build: Callable[[], nn.Module]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dynamic: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    family: str = "encoder"

    def __repr__(self) -> str:
        return f"CorpusEntry({self.name!r})"


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make().eval()
    return build


def _hf(model_class: str, config_class: str, **config: Any) -> Callable[[], nn.Module]:
    """A builder for ``transformers.<model_class>(<config_class>(**config))``."""

    def make() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_class)(**config)
        return getattr(transformers, model_class)(cfg)

    return _seeded(make)


def _ids(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    # Token 0 is often the pad id; keep real tokens away from it.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


def _mask(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -2:] = 0  # the second sequence is padded: masking must really be exercised
    return mask


def _floats(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


_TEXT = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
_IMAGE = {"pixel_values": {0: "batch"}}
# Shared small transformer sizes (BERT-style and decoder-style config spellings).
_BERT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64)
_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                max_position_embeddings=64, use_cache=False)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                decoder_ffn_dim=37, max_position_embeddings=64, use_cache=False,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def _text(name: str, model: str, config: str, family: str = "encoder", **cfg: Any) -> CorpusEntry:
    return CorpusEntry(name, _hf(model, config, **cfg), (_ids(),),
                       {"attention_mask": _mask()}, _TEXT, family)


def _seq2seq(name: str, model: str, config: str, **cfg: Any) -> CorpusEntry:
    return CorpusEntry(name, _hf(model, config, **cfg), (_ids(),),
                       {"attention_mask": _mask(),
                        "decoder_input_ids": _ids(seq=SEQ - 2, seed=3)},
                       {**_TEXT, "decoder_input_ids": {0: "batch", 1: "target"}},
                       "encoder-decoder")


def _image(name: str, model: str, config: str, size: int = 32, **cfg: Any) -> CorpusEntry:
    return CorpusEntry(name, _hf(model, config, **cfg), (_floats(BATCH, 3, size, size),),
                       {}, _IMAGE, "vision")


def _whisper_encoder() -> nn.Module:
    import transformers

    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
        decoder_ffn_dim=37, max_source_positions=16, max_target_positions=32, use_cache=False,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    # Users embed Whisper's audio encoder on its own (e.g. for audio features).
    return transformers.WhisperModel(cfg).get_encoder()


_AUDIO_CONV = dict(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
_AUDIO = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, vocab_size=VOCAB, **_AUDIO_CONV)

ENTRIES: list[CorpusEntry] = [
    # -- text encoders ---------------------------------------------------------------------
    _text("bert", "BertModel", "BertConfig", **_BERT),
    _text("bert-mlm", "BertForMaskedLM", "BertConfig", **_BERT),  # LM head tied to embedding
    _text("roberta", "RobertaModel", "RobertaConfig", pad_token_id=1, **_BERT),
    _text("xlm-roberta-cls", "XLMRobertaForSequenceClassification", "XLMRobertaConfig",
          pad_token_id=1, num_labels=3, **_BERT),
    _text("distilbert", "DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN,
          n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64),
    _text("albert", "AlbertModel", "AlbertConfig", embedding_size=16, **_BERT),
    _text("electra", "ElectraModel", "ElectraConfig", embedding_size=16, **_BERT),
    _text("deberta-v2", "DebertaV2Model", "DebertaV2Config", **_BERT),
    _text("mpnet", "MPNetModel", "MPNetConfig", **_BERT),
    # -- decoders --------------------------------------------------------------------------
    _text("gpt2-lm", "GPT2LMHeadModel", "GPT2Config", "decoder", vocab_size=VOCAB, n_embd=HIDDEN,
          n_layer=2, n_head=4, n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=2),
    _text("gpt-neo", "GPTNeoForCausalLM", "GPTNeoConfig", "decoder", vocab_size=VOCAB,
          hidden_size=HIDDEN, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
          window_size=4, max_position_embeddings=64, use_cache=False, bos_token_id=0,
          eos_token_id=2),
    _text("opt", "OPTForCausalLM", "OPTConfig", "decoder", vocab_size=VOCAB, hidden_size=HIDDEN,
          num_hidden_layers=2, num_attention_heads=4, ffn_dim=37, word_embed_proj_dim=HIDDEN,
          max_position_embeddings=64, use_cache=False, pad_token_id=1),
    _text("llama", "LlamaForCausalLM", "LlamaConfig", "decoder", **_DECODER),
    _text("mistral", "MistralForCausalLM", "MistralConfig", "decoder", **_DECODER),
    _text("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "decoder", tie_word_embeddings=True,
          **_DECODER),
    _text("phi", "PhiForCausalLM", "PhiConfig", "decoder", **_DECODER),
    _text("gemma", "GemmaForCausalLM", "GemmaConfig", "decoder", head_dim=8, **_DECODER),
    _text("bloom", "BloomForCausalLM", "BloomConfig", "decoder", vocab_size=VOCAB,
          hidden_size=HIDDEN, n_layer=2, n_head=4, use_cache=False),
    # -- encoder-decoders ------------------------------------------------------------------
    CorpusEntry("t5", _hf("T5Model", "T5Config", vocab_size=VOCAB, d_model=HIDDEN, d_kv=8,
                          d_ff=37, num_layers=2, num_heads=4, use_cache=False,
                          decoder_start_token_id=0),
                (_ids(),), {"attention_mask": _mask(), "decoder_input_ids": _ids(seq=SEQ - 2,
                                                                                 seed=3)},
                {**_TEXT, "decoder_input_ids": {0: "batch", 1: "target"}}, "encoder-decoder"),
    _seq2seq("bart", "BartModel", "BartConfig", **_SEQ2SEQ),
    _seq2seq("marian-mt", "MarianMTModel", "MarianConfig", **_SEQ2SEQ),
    _seq2seq("pegasus", "PegasusModel", "PegasusConfig", **_SEQ2SEQ),
    # -- vision ----------------------------------------------------------------------------
    _image("resnet", "ResNetModel", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32],
           depths=[1, 1], layer_type="basic"),
    _image("convnext", "ConvNextModel", "ConvNextConfig", hidden_sizes=[16, 32], depths=[1, 1],
           num_stages=2),
    _image("mobilenet-v2", "MobileNetV2Model", "MobileNetV2Config", depth_multiplier=0.25,
           image_size=32),
    _image("efficientnet-cls", "EfficientNetForImageClassification", "EfficientNetConfig",
           image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128,
           num_labels=3, initializer_range=0.5),  # 0.02 shrinks activations to subnormals
    _image("vit", "ViTModel", "ViTConfig", image_size=32, patch_size=8, **_BERT),
    _image("deit-cls", "DeiTForImageClassificationWithTeacher", "DeiTConfig", image_size=32,
           patch_size=8, num_labels=3, **_BERT),
    _image("swin", "SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
           depths=[1, 1], num_heads=[2, 4], window_size=4),
    _image("segformer", "SegformerModel", "SegformerConfig", num_encoder_blocks=2,
           depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
           patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]),
    # -- audio -----------------------------------------------------------------------------
    CorpusEntry("wav2vec2", _hf("Wav2Vec2Model", "Wav2Vec2Config", **_AUDIO),
                (_floats(BATCH, 400),), {}, {"input_values": {0: "batch", 1: "samples"}},
                "audio"),
    CorpusEntry("hubert", _hf("HubertModel", "HubertConfig", **_AUDIO), (_floats(BATCH, 400),),
                {}, {"input_values": {0: "batch", 1: "samples"}}, "audio"),
    CorpusEntry("whisper-encoder", _seeded(_whisper_encoder), (_floats(BATCH, 16, 32),), {},
                {"input_features": {0: "batch"}}, "audio"),
]


def by_name(name: str) -> CorpusEntry:
    """The corpus entry called ``name``."""
    for entry in ENTRIES:
        if entry.name == name:
            return entry
    raise KeyError(f"no corpus entry {name!r}; have {[e.name for e in ENTRIES]}")
