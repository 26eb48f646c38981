"""Collation: a batch of raw items -> the tensors a hub module's signature takes.

``module_collate(module, "features")`` prepares raw images or text through the signature's
own declarative preprocessing, so a user writes no glue between a folder of images and a hub
module.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from graft.data.labels import first_few
from graft.errors import DataError, SignatureError

__all__ = ["ModuleCollate", "collate_images", "collate_text", "module_collate",
           "module_transform", "signature_of"]


class ModuleCollate:
    """Turns a batch of ``(example, label)`` items into ``(inputs, labels)`` for a signature.

    Raw examples (images, image arrays, paths, strings) go through the signature's declarative
    preprocessing; tensors are stacked as they are. ``inputs`` is one tensor for a one-input
    signature (images), else a dict input name -> tensor (text: token ids, attention mask);
    ``labels`` is int64 ``(B,)``. Built by ``module_collate``; it pickles, so it works in
    ``DataLoader`` worker processes.
    """

    def __init__(self, input_names: Sequence[str], preprocess: Any = None,
                 tokenizer_path: str | os.PathLike[str] | None = None) -> None:
        from graft.format.spec import ImagePreprocess, TextPreprocess

        self.input_names = list(input_names)
        self.preprocess = preprocess
        self.tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
        if isinstance(preprocess, TextPreprocess) and self.tokenizer_path is None:
            raise DataError("text preprocessing needs the tokenizer file; pass tokenizer_path")
        if preprocess is not None and not isinstance(preprocess, (ImagePreprocess,
                                                                  TextPreprocess)):
            raise DataError(f"preprocess must be an ImagePreprocess or TextPreprocess, got "
                            f"{type(preprocess).__name__}")
        self._fn: Callable[[Any], dict[str, torch.Tensor]] | None = None

    @property
    def kind(self) -> str | None:
        """``"image"``, ``"text"``, or ``None`` when examples must already be tensors."""
        return None if self.preprocess is None else self.preprocess.kind

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fn"] = None  # rebuilt in the worker
        return state

    def _preprocessor(self) -> Callable[[Any], dict[str, torch.Tensor]]:
        if self._fn is None:
            from graft.runtime import preprocess as pre

            if self.kind == "image":
                self._fn = pre.image_preprocessor(self.preprocess, self.input_names[0])
            else:
                self._fn = pre.text_preprocessor(self.preprocess, self.tokenizer_path,
                                                 self.input_names)
        return self._fn

    def one(self, example: Any) -> torch.Tensor:
        """One image example as the ``(3, size, size)`` tensor the signature takes."""
        if isinstance(example, torch.Tensor):
            return example
        if self.kind != "image":
            raise DataError(f"example is a {type(example).__name__}, but this signature "
                            + ("takes text in batches; use inputs(examples)" if self.kind
                               else "has no preprocessing: give tensors (use a transform)"))
        try:
            return self._preprocessor()([example])[self.input_names[0]][0]
        except SignatureError as exc:
            raise DataError(f"cannot preprocess an example: {exc}") from None

    def inputs(self, examples: Sequence[Any],
               executor: Executor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """The batched inputs for ``examples``; image decoding runs on ``executor`` if given."""
        if not examples:
            raise DataError("cannot collate an empty batch")
        first = examples[0]
        if isinstance(first, Mapping):
            return {k: _stack([e[k] for e in examples], k) for k in first}
        if isinstance(first, torch.Tensor) or self.kind == "image":
            tensors = (list(executor.map(self.one, examples)) if executor is not None
                       else [self.one(e) for e in examples])
            return _stack(tensors, self.input_names[0])
        if self.kind == "text":
            try:
                out = self._preprocessor()(list(examples))
            except SignatureError as exc:
                raise DataError(f"cannot preprocess a batch of text: {exc}") from None
            return out
        raise DataError(f"example is a {type(first).__name__}, but the signature has no "
                        "preprocessing; give tensors (use a transform)")

    def __call__(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, torch.Tensor]:
        if not batch:
            raise DataError("cannot collate an empty batch")
        examples = [item[0] for item in batch]
        labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.int64)
        return self.inputs(examples), labels

    def __repr__(self) -> str:
        return f"ModuleCollate(inputs={self.input_names}, preprocess={self.preprocess!r})"


def _stack(tensors: Sequence[Any], name: str) -> torch.Tensor:
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        kinds = sorted({type(t).__name__ for t in tensors})
        raise DataError(f"input {name!r}: a batch mixes example kinds {kinds}; make every "
                        "example the same kind")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataError(f"input {name!r}: examples have different shapes "
                        f"{first_few(sorted(shapes), 3)}; resize or pad them to one shape")
    return torch.stack(list(tensors))


def signature_of(module: Any, signature: str | None = None) -> tuple[Any, str, Any]:
    """``(graft.Module, signature name, SignatureSpec)`` from a module or a signature view.

    Raises:
        SignatureError: the module has no such signature.
    """
    from graft.runtime.module import BoundSignature

    if isinstance(module, BoundSignature):
        if signature is not None and signature != module.name:
            raise DataError(f"got the signature view {module.name!r} and signature="
                            f"{signature!r}; give one of them")
        module, signature = module.module, module.name
    name = signature or module.default_signature
    module.signature(name)  # a clear SignatureError for an unknown name
    return module, name, module.signatures[name].spec


def module_collate(module: Any, signature: str | None = None) -> ModuleCollate:
    """A ``DataLoader`` ``collate_fn`` that prepares raw items for a module's signature.

    Args:
        module: A ``graft.Module``, or one of its signature views (``module.signature(...)``).
        signature: The signature's name (``None``: the view's, or the module's default).

    Returns:
        ``collate(batch) -> (inputs, labels)``: ``inputs`` is a tensor for one-input signatures
        (images ``(B, 3, S, S)``), else a dict input name -> tensor (text: token ids and
        attention mask, int64 ``(B, T)``); ``labels`` is int64 ``(B,)``.
    """
    from graft.format.spec import TextPreprocess

    module, _, spec = signature_of(module, signature)
    tokenizer = None
    if isinstance(spec.preprocess, TextPreprocess):
        tokenizer = module.asset_path(spec.preprocess.tokenizer.removeprefix("assets/"))
    return ModuleCollate(list(spec.inputs), spec.preprocess, tokenizer)


def module_transform(module: Any, signature: str | None = None) -> Callable[[Any], torch.Tensor]:
    """A per-example transform (e.g. for ``ImageFolder``): image -> ``(3, S, S)`` tensor."""
    from graft.format.spec import ImagePreprocess

    _, name, spec = signature_of(module, signature)
    if not isinstance(spec.preprocess, ImagePreprocess):
        raise DataError(f"signature {name!r} has no image preprocessing, so there is no "
                        "per-example transform; use module_collate(module, signature) for "
                        "text, or give tensors")
    return ModuleCollate(list(spec.inputs), spec.preprocess).one


def collate_images(preprocess: Any, input_name: str = "images") -> ModuleCollate:
    """A collate function for images under an ``ImagePreprocess`` (no module needed)."""
    return ModuleCollate([input_name], preprocess)


def collate_text(tokenizer_path: str | os.PathLike[str], max_length: int = 128,
                 input_names: Sequence[str] = ("input_ids", "attention_mask")) -> ModuleCollate:
    """A collate function for strings through a ``tokenizer.json`` file (no module needed)."""
    from graft.format.spec import TextPreprocess

    return ModuleCollate(list(input_names), TextPreprocess("assets/tokenizer.json", max_length),
                         tokenizer_path)
