"""``graft.Module``: a loaded module, an ordinary ``nn.Module`` over shared weights."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from graft.errors import FormatError, SignatureError
from graft.format.entries import BATCH_NORM_POLICIES
from graft.format.manifest import Manifest, resolve_inside
from graft.runtime.outputs import build_outputs
from graft.runtime.program import Program, program_from_json
from graft.format.spec import ImagePreprocess, SignatureSpec, TextPreprocess

__all__ = ["BoundSignature", "FROZEN_BN", "Module"]

#: The program variant that trains with batch norm frozen (running statistics used, kept).
FROZEN_BN = "train_frozen_bn"


def _tree(tensors: Mapping[str, torch.Tensor], kinds: Mapping[str, str],
          trainable: bool, aliases: Mapping[str, str] | None = None,
          frozen: frozenset[str] = frozenset()) -> nn.Module:
    """Nest tensors into empty ``nn.Module``s so they keep their fully-qualified names.

    A tied tensor (``aliases``: other name -> stored name) is registered under each of its
    names as the same object, as in the source model, so training through one name trains
    the other. Parameters in ``frozen`` (untrained in the source model) never require grad.
    """
    root = nn.Module()
    registered: dict[str, torch.Tensor] = {}
    for fqn in [*tensors, *(aliases or {})]:
        canonical = (aliases or {}).get(fqn, fqn)
        *path, leaf = fqn.split(".")
        owner = root
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if canonical in registered:
            value = registered[canonical]
        elif kinds[canonical] == "parameter":
            value = nn.Parameter(tensors[canonical],
                                 requires_grad=trainable and canonical not in frozen)
        else:
            value = tensors[canonical]
        registered[canonical] = value
        if kinds[canonical] == "parameter":
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    return root


class Module(nn.Module):
    """A module loaded from the hub: named signatures over one shared set of weights.

    ``m(x)`` calls the default signature; ``m.signature("features")`` returns an ``nn.Module``
    view of another one. Parameters live under ``m.weights`` by their original names, so
    optimizers, ``state_dict`` and ``named_parameters`` work as usual.

    Frozen (``trainable=False``) modules always run their eval programs, as a black box. A
    trainable module runs the train programs in ``.train()`` mode (dropout on; batch norm
    uses and updates batch statistics, or with ``batch_norm="frozen"`` uses and keeps its
    running statistics) and the eval programs in ``.eval()`` mode, always over the same
    parameter objects.
    """

    def __init__(self, manifest: Manifest, directory: Path, tensors: Mapping[str, torch.Tensor],
                 *, trainable: bool, batch_norm: str | None = None,
                 on_demand: Any = None) -> None:
        super().__init__()
        self.manifest = manifest
        # where programs, constants and assets are read (a store tree holds them whole);
        # ``on_demand`` writes the whole module directory out for ``directory``
        self._files = Path(directory)
        self._on_demand = on_demand
        self.trainable = trainable
        self.batch_norm = batch_norm or manifest.fine_tuning.batch_norm
        if self.batch_norm not in BATCH_NORM_POLICIES:
            raise SignatureError(f"batch_norm={self.batch_norm!r} is unknown; expected one of "
                                 f"{BATCH_NORM_POLICIES}")
        kinds = {k: v.kind for k, v in manifest.tensors.items()}
        try:
            self.weights = _tree(tensors, kinds, trainable, manifest.aliases,
                                 frozenset(manifest.fine_tuning.frozen))
        except KeyError as exc:  # nn.Module refuses a name it already uses ("training", ...)
            raise FormatError(f"module {manifest.name}: a tensor name clashes with another "
                              f"tensor or an nn.Module attribute ({exc}); re-export the "
                              "module from a model whose parameter names are plain") from None
        self._programs: dict[tuple[str, str], tuple[Program, dict[str, torch.Tensor]]] = {}
        self._views: dict[str, BoundSignature] = {}
        self._preprocessors: dict[str, Callable[..., dict[str, torch.Tensor]]] = {}
        self.train(False)

    # -- what it is ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def signatures(self) -> Mapping[str, BoundSignature]:
        """Signature name -> its callable view, as TF Hub's ``loaded.signatures["name"](x)``.

        Each value is what :meth:`signature` returns; its spec (inputs, outputs,
        preprocessing) is ``m.signatures[name].spec``. The specs alone are
        ``m.manifest.signatures``.
        """
        return _Signatures(self)

    @property
    def default_signature(self) -> str:
        return self.manifest.default_signature

    def asset_path(self, name: str) -> Path:
        """The path of an asset file (``labels.txt``, ``tokenizer.json``, ...)."""
        rel = f"assets/{name}"
        if rel not in self.manifest.files:
            assets = sorted(f.removeprefix("assets/") for f in self.manifest.files
                            if f.startswith("assets/"))
            raise FileNotFoundError(f"module {self.name} has no asset {name!r}; it has "
                                    f"{assets}")
        return resolve_inside(self._files.resolve(), rel)

    def file_path(self, rel: str) -> Path:
        """The path of the module file ``rel`` (as the manifest lists it). Files a store tree
        keeps whole (programs, assets, the tokenizer) are read in place; weights and
        reference files, which it keeps as tensor blobs, come from :attr:`directory`."""
        if rel not in self.manifest.files:
            raise FileNotFoundError(f"module {self.name} has no file {rel!r}")
        here = resolve_inside(self._files.resolve(), rel)
        if self._on_demand is None or os.path.lexists(here):
            return here
        return resolve_inside(self.directory.resolve(), rel)

    @property
    def directory(self) -> Path:
        """A module directory holding every file of the module. For a module from the local
        store, whose tree keeps its weights and reference files as blobs, it is written out
        (into the store's ``tmp/``) on first use and removed when the module is gone."""
        if self._on_demand is not None:
            return Path(self._on_demand.path())
        return self._files

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, version={self.version!r}, "
                f"signatures={list(self.manifest.signatures)}, trainable={self.trainable}, "
                f"batch_norm={self.batch_norm!r}")

    # -- calling ---------------------------------------------------------------------------

    def signature(self, name: str) -> BoundSignature:
        """An ``nn.Module`` that calls signature ``name`` of this module."""
        if name not in self.manifest.signatures:
            raise SignatureError(f"module {self.name} has no signature {name!r}; it has "
                                 f"{sorted(self.manifest.signatures)}")
        if name not in self._views:
            # Kept in a plain dict, not as a submodule: the view owns the module, not the reverse.
            self._views[name] = BoundSignature(self, name)
        return self._views[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.default_signature, *args, **kwargs)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run signature ``name``: check inputs, apply preprocessing, run its program.

        Returns:
            What the source model returned, rebuilt from the signature's output structure
            (a tensor, tuple, list, dict, or ``Outputs`` record for a ``ModelOutput``); for a
            signature without one, the output tensor, or a dict name -> tensor.
        """
        values = self.call_outputs(name, *args, **kwargs)  # refuses an unknown name
        spec = self.manifest.signatures[name]
        if spec.structure is not None:
            return build_outputs(spec.structure, values)
        if len(values) == 1:
            return next(iter(values.values()))
        return values

    def call_outputs(self, name: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run signature ``name`` and return its outputs flat, by output name."""
        spec = self.manifest.signatures.get(name)
        if spec is None:
            raise SignatureError(f"module {self.name} has no signature {name!r}; it has "
                                 f"{sorted(self.manifest.signatures)}")
        inputs = self._bind(name, spec, args, kwargs)
        variant = "eval"
        if self.training and self.trainable:
            # A signature without batch norm has no frozen variant: its train program is it.
            frozen = self.batch_norm == "frozen" and FROZEN_BN in spec.programs
            variant = FROZEN_BN if frozen else "train" if "train" in spec.programs else "eval"
        program, constants = self._program(name, variant)
        state = self._state()
        outputs = program(state, constants, inputs)
        return dict(zip(spec.outputs, outputs, strict=True))

    def _bind(self, name: str, spec: SignatureSpec, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> list[torch.Tensor]:
        names = list(spec.inputs)
        if spec.preprocess is not None and args and not isinstance(args[0], torch.Tensor):
            if len(args) > 1 or kwargs:
                raise SignatureError(f"signature {name!r} preprocesses raw "
                                     f"{spec.preprocess.kind} data: pass it alone, as one "
                                     "argument")
            kwargs = self._preprocess(name, spec, args[0])
            args = ()
        if len(args) > len(names):
            raise SignatureError(f"signature {name!r} takes {len(names)} inputs {names}, got "
                                 f"{len(args)} positional arguments")
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in spec.inputs:
                raise SignatureError(f"signature {name!r} has no input {key!r}; its inputs "
                                     f"are {names}")
            if key in bound:
                raise SignatureError(f"input {key!r} of signature {name!r} given twice")
            bound[key] = value
        missing = [n for n in names if n not in bound]
        if missing:
            raise SignatureError(f"signature {name!r} is missing inputs {missing}; it takes "
                                 + ", ".join(f"{k}: {v}" for k, v in spec.inputs.items()))
        sizes: dict[str, int] = {}
        for key, tensor_spec in spec.inputs.items():
            tensor_spec.check(key, bound[key], sizes)
        spec.check_dims(sizes)
        return [bound[k] for k in names]

    def _preprocess(self, name: str, spec: SignatureSpec, data: Any) -> dict[str, torch.Tensor]:
        from graft.runtime import preprocess as pre

        fn = self._preprocessors.get(name)
        if fn is None:
            if isinstance(spec.preprocess, ImagePreprocess):
                fn = pre.image_preprocessor(spec.preprocess, next(iter(spec.inputs)))
            elif isinstance(spec.preprocess, TextPreprocess):
                path = resolve_inside(self._files.resolve(), spec.preprocess.tokenizer)
                fn = pre.text_preprocessor(spec.preprocess, path, list(spec.inputs))
            else:  # pragma: no cover - the manifest parser admits no other kind
                raise FormatError(f"unknown preprocessing {spec.preprocess!r}")
            self._preprocessors[name] = fn
        device = self._device()
        return {k: v.to(device) for k, v in fn(data).items()}

    # -- programs and state ----------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        # Every name of a tied tensor: a program may bind any of them.
        state = dict(self.weights.named_parameters(remove_duplicate=False))
        state.update(self.weights.named_buffers(remove_duplicate=False))
        return state

    def _device(self) -> torch.device:
        """Where the module's weights are (CPU for a module without any)."""
        return next(iter(self._state().values()), torch.empty(0)).device

    def _program(self, name: str, variant: str) -> tuple[Program, dict[str, torch.Tensor]]:
        key = (name, variant)
        if key not in self._programs:
            rel = self.manifest.signatures[name].programs[variant]
            path = resolve_inside(self._files.resolve(), rel)
            device = self._device()
            # Validated again on every read: the bytes on disk are what runs.
            program = program_from_json(path.read_bytes(), name=f"{self.name}:{rel}",
                                        device=device, train=variant != "eval")
            constants: dict[str, torch.Tensor] = {}
            const_rel = rel.removesuffix(".json") + ".constants.safetensors"
            if const_rel in self.manifest.files:
                from graft.runtime.load import read_safetensors

                constants = read_safetensors(resolve_inside(self._files.resolve(), const_rel))
            constants = {k: v.to(device) for k, v in constants.items()}
            program.check_bindings(self._state(), constants)
            self._programs[key] = (program, constants)
        return self._programs[key]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Module:
        # Moving the module (.to, .cuda, .half) must move cached program constants too.
        super()._apply(fn, recurse)
        self._programs.clear()
        return self

    def program_code(self, name: str | None = None, variant: str = "eval") -> str:
        """A signature's program as readable Python-like text, op by op, for people.

        The program is interpreted node by node, never compiled: this text is generated from
        the validated graph with Graft's own names (``in0``, ``n0``, ...) and is not run.
        """
        program, _ = self._program(name or self.default_signature, variant)
        return program.code()

    def describe(self) -> str:
        """A human-readable table of the signatures."""
        rows = []
        for key, spec in self.manifest.signatures.items():
            mark = "*" if key == self.default_signature else " "
            ins = ", ".join(f"{k}: {v}" for k, v in spec.inputs.items())
            outs = ", ".join(f"{k}: {v}" for k, v in spec.outputs.items())
            pre = f" [{spec.preprocess.kind}]" if spec.preprocess else ""
            rows.append(f"{mark} {key}({ins}) -> {outs}{pre}")
        return "\n".join(rows)


class BoundSignature(nn.Module):
    """One signature of a ``graft.Module`` as an ``nn.Module`` (composes with nn.Sequential).

    Its parameters are the parent module's, so an optimizer over a model that contains the
    view trains the shared weights.
    """

    def __init__(self, module: Module, name: str) -> None:
        super().__init__()
        self.module = module
        self.name = name

    @property
    def spec(self) -> SignatureSpec:
        return self.module.manifest.signatures[self.name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.call(self.name, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"signature={self.name!r}"


class _Signatures(Mapping[str, BoundSignature]):
    """The read-only ``Module.signatures`` mapping: name -> callable view."""

    def __init__(self, module: Module) -> None:
        self._module = module

    def __getitem__(self, name: str) -> BoundSignature:
        return self._module.signature(name)  # SignatureError naming the signatures it has

    def __contains__(self, name: object) -> bool:
        return name in self._module.manifest.signatures

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._module.manifest.signatures)

    def __len__(self) -> int:
        return len(self._module.manifest.signatures)

    def __repr__(self) -> str:
        return f"signatures({', '.join(self._module.manifest.signatures)})"
