"""Every limit the module format sets on untrusted input, in one place.

A module, a registry response or a raw input may ask for absurd work: a tensor of 10^12
elements, a million-node program, JSON nested ten thousand deep, a 100000 x 100000 resize, a
tokenizer ``max_length`` of 10^9. Readers refuse such input with a ``FormatError`` (or, for
raw call inputs, a ``DataError``) before they allocate memory or spend time on it. Each limit
is far above what any real module needs (the largest shipped today are noted) and is
documented in docs/format.md; a reader of the format must apply the same ones.

Nothing here imports anything: the limits are plain integers.
"""

from __future__ import annotations

__all__ = [
    "MAX_DIM_SIZE",
    "MAX_FILES",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MAX_INT",
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME_CHARS",
    "MAX_PATH_CHARS",
    "MAX_PICKLE_SCAN_OPS",
    "MAX_PROGRAM_BYTES",
    "MAX_PROGRAM_ELEMENTS",
    "MAX_PROGRAM_LIST",
    "MAX_PROGRAM_NODES",
    "MAX_SAFETENSORS_HEADER_BYTES",
    "MAX_SAFETENSORS_TENSORS",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_TENSORS",
    "MAX_TENSOR_ELEMENTS",
    "MAX_TENSOR_RANK",
    "MAX_TEXT_CHARS",
    "MAX_TEXT_CHARS_PER_TOKEN",
    "MAX_TEXT_MAX_LENGTH",
    "MAX_TOKENIZER_BYTES",
    "MAX_ZIP_ENTRIES",
]

# -- JSON (jsonio) ---------------------------------------------------------------------------

#: Deepest nesting of arrays and objects (programs nest about six levels, manifests five).
MAX_JSON_DEPTH = 64
#: Longest integer literal, in digits (int64 needs 19).
MAX_INT_DIGITS = 20
#: Largest magnitude of an integer literal: int64 (``9223372036854775807`` is the "to the
#: end" of a slice in exported programs). A wider integer means something else to every
#: reader that stores integers in 64 bits.
MAX_INT = 2**63 - 1

# -- graft.json --------------------------------------------------------------------------------

#: Bytes of ``graft.json`` (MiniLM's is 40 KB; one entry per file and per tensor).
MAX_MANIFEST_BYTES = 16 << 20
#: Characters of a free-text field (description, license, parent handle).
MAX_TEXT_CHARS = 1 << 16
#: Characters of a name: signature, input, output, dimension, tensor-spec name.
MAX_NAME_CHARS = 128
#: Characters of a module-relative path.
MAX_PATH_CHARS = 1024
#: Files a manifest lists.
MAX_FILES = 100_000
#: Signatures of one module, and inputs or outputs of one signature.
MAX_SIGNATURES = 1024
MAX_SIGNATURE_TENSORS = 1024
#: Dimensions of one tensor (torch's own limit is 64).
MAX_TENSOR_RANK = 32
#: Elements of one tensor, fixed dimensions multiplied (the largest embedding tables of
#: public models hold about 10^9).
MAX_TENSOR_ELEMENTS = 1 << 34
#: A fixed dimension of a tensor spec, or a dimension bound.
MAX_DIM_SIZE = MAX_TENSOR_ELEMENTS

# -- programs (format/graph.py) ---------------------------------------------------------------

#: Bytes of one program file (EfficientNet-Lite0's eval program is 400 KB).
MAX_PROGRAM_BYTES = 64 << 20
#: Nodes of one program (EfficientNet-Lite0 has about 900, a 7B-parameter LLM about 10^4).
MAX_PROGRAM_NODES = 200_000
#: Items of one list argument of a program node.
MAX_PROGRAM_LIST = 10_000
#: Elements a program node may ask an allocating operator for from literal sizes
#: (``aten.zeros([...])``, ``aten.full``, ``aten.arange``).
MAX_PROGRAM_ELEMENTS = 2**32

# -- safetensors files ------------------------------------------------------------------------

#: Bytes of a safetensors JSON header (the safetensors library's own limit is 10^8).
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
#: Tensors in one safetensors file.
MAX_SAFETENSORS_TENSORS = 1_000_000

# -- other files --------------------------------------------------------------------------------

#: Opcodes of a pickle-like stream the pickle check decodes; a file that still decodes as a
#: valid pickle stream after this many is refused as one (plain text fails within a few).
MAX_PICKLE_SCAN_OPS = 1_000_000
#: Entries of a zip archive whose names and contents the pickle check inspects.
MAX_ZIP_ENTRIES = 100_000
#: Bytes of a ``tokenizer.json`` asset (multilingual tokenizers reach 17 MB).
MAX_TOKENIZER_BYTES = 64 << 20

# -- preprocessing ------------------------------------------------------------------------------

#: ``size`` and ``resize`` of image preprocessing, in pixels (models take 224 to 1024).
MAX_IMAGE_SIDE = 8192
#: Pixels of an image file, declared in its header and checked before it is decoded, and of
#: the resized image (an extreme aspect ratio would otherwise make a 256-pixel resize huge).
#: Pillow's own warning threshold is 89 million pixels.
MAX_IMAGE_PIXELS = 1 << 26
#: ``max_length`` of text preprocessing, in tokens (long-context models take 131072).
MAX_TEXT_MAX_LENGTH = 1 << 17
#: Characters kept per token of ``max_length`` when a string is cut before tokenising, so
#: memory stays bounded for a text of any length. English averages about four characters per
#: token; a string is cut only past ``max_length * 32`` characters, so the first
#: ``max_length`` tokens (all that truncation keeps) change only for text that averages more
#: than 32 characters per token.
MAX_TEXT_CHARS_PER_TOKEN = 32
