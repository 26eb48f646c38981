"""Regenerate ``src/graft/format/operators.json``: the operators a program may call.

The list is closed and shipped as data. It holds two kinds of entries:

- ATen overloads gathered by exporting real models (the tiny test models of
  ``tests/conftest.py``, the zoo's EfficientNet-Lite0 and MiniLM, and the ``transformers``
  corpus of ``tests/export/corpus.py``) in eval and train mode, exactly as ``graft.save``
  exports them;
- a hand-curated set of common pure operators (elementwise math, reductions, the matmul
  family, convolution, pooling and normalisation, softmax, views, indexing, factories), with
  every overload torch has for them, so that ordinary architectures load without a new list.

Each candidate is kept only if it is a pure tensor function judged from its schema: no
``str`` argument that is not enumerated here, no ``Dimname``/``Storage``/``Stream`` argument,
no ``out=`` variant, no mutable list, no op on the deny list (file, process, global-state or
storage effects). The schema of every kept overload is written as data, so the reader
(``graft.format.graph``, which never imports torch) can check argument types and keyword
names, and the runner resolves only names from this file.

Run: ``.venv/bin/python scripts/operators.py`` (``--no-corpus`` skips the transformers
corpus, ``--report PATH`` writes which model needed which operator and why any was refused).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

OUT = ROOT / "src" / "graft" / "format" / "operators.json"

# -- the hand-curated set ---------------------------------------------------------------------

_UNARY = """abs neg exp exp2 expm1 log log2 log10 log1p sqrt rsqrt sin cos tan asin acos atan
sinh cosh tanh asinh acosh atanh sigmoid logit erf erfc erfinv floor ceil round trunc frac sign
sgn reciprocal square relu relu6 gelu silu mish elu selu celu leaky_relu hardtanh hardsigmoid
hardswish softplus softshrink hardshrink logical_not bitwise_not isnan isinf isfinite isneginf
isposinf nan_to_num positive signbit clamp clamp_min clamp_max clip threshold prelu glu
_prelu_kernel lgamma digamma i0 sinc deg2rad rad2deg conj resolve_conj resolve_neg"""
_BINARY = """add sub rsub mul div true_divide floor_divide remainder fmod pow float_power atan2
maximum minimum fmax fmin eq ne lt le gt ge logical_and logical_or logical_xor bitwise_and
bitwise_or bitwise_xor bitwise_left_shift bitwise_right_shift where lerp addcmul addcdiv hypot
copysign xlogy masked_fill masked_scatter isclose heaviside"""
_REDUCE = """sum mean prod amax amin max min argmax argmin std var std_mean var_mean norm
linalg_vector_norm logsumexp cumsum cumprod cummax cummin logcumsumexp all any count_nonzero
median nanmedian nanmean nansum aminmax topk sort argsort kthvalue"""
_LINEAR = """mm bmm matmul addmm addbmm baddbmm addmv mv dot vdot linear bilinear einsum outer
tensordot _addmm_activation"""
_NN = """conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d
conv_transpose3d max_pool1d max_pool2d max_pool3d max_pool2d_with_indices
max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d batch_norm native_batch_norm
_native_batch_norm_legit _native_batch_norm_legit_no_training
_native_batch_norm_legit_functional layer_norm native_layer_norm group_norm native_group_norm
instance_norm rms_norm pixel_shuffle pixel_unshuffle upsample_nearest1d upsample_nearest2d
upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d
_upsample_bilinear2d_aa _upsample_bicubic2d_aa upsample_trilinear3d grid_sampler
grid_sampler_2d grid_sampler_3d affine_grid_generator im2col col2im constant_pad_nd pad
reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
replication_pad3d softmax _softmax log_softmax _log_softmax scaled_dot_product_attention
_scaled_dot_product_flash_attention_for_cpu dropout native_dropout feature_dropout
alpha_dropout feature_alpha_dropout bernoulli rand rand_like randn randn_like randint
randint_like embedding embedding_bag _embedding_bag one_hot cross_entropy_loss nll_loss
nll_loss_nd nll_loss2d mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy
binary_cross_entropy_with_logits kl_div cosine_similarity pairwise_distance cdist
_euclidean_dist lstm gru rnn_tanh rnn_relu lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
channel_shuffle native_channel_shuffle"""
_SHAPE = """view reshape _unsafe_view view_as reshape_as flatten unflatten squeeze unsqueeze
permute transpose t expand expand_as contiguous clone alias detach narrow slice select split
split_with_sizes unsafe_split chunk unsafe_chunk unbind tensor_split movedim moveaxis swapaxes
swapdims diagonal unfold flip roll rot90 repeat tile repeat_interleave tril triu diag
diag_embed cat concat concatenate stack hstack vstack dstack column_stack broadcast_to
broadcast_tensors atleast_1d atleast_2d atleast_3d squeeze_copy unsqueeze_copy view_copy
permute_copy transpose_copy expand_copy slice_copy select_copy t_copy alias_copy
split_copy split_with_sizes_copy unbind_copy diagonal_copy unfold_copy slice_scatter
select_scatter diagonal_scatter"""
_INDEX = """index index_select gather scatter scatter_add scatter_reduce index_put index_add
index_copy index_fill take_along_dim take nonzero nonzero_static masked_select argwhere
bucketize searchsorted isin unique_consecutive _unique2 unique_dim"""
_FACTORY = """zeros ones full empty empty_like zeros_like ones_like full_like new_zeros
new_ones new_full new_empty empty_strided new_empty_strided arange linspace logspace eye
scalar_tensor lift_fresh_copy lift_fresh _to_copy to type_as fill zero fill_diagonal_
tril_indices triu_indices"""
_MISC = """sym_size sym_stride sym_numel sym_storage_offset item _local_scalar_dense copy
copy_ _assert_tensor_metadata sym_constrain_range_for_size sym_constrain_range
_functional_sym_constrain_range_for_size cross linalg_cross complex polar real imag angle
view_as_real view_as_complex _conj _neg_view trace diff cumulative_trapezoid histc
floor_divide_ _safe_softmax"""

CURATED_OPS = sorted(set(" ".join([_UNARY, _BINARY, _REDUCE, _LINEAR, _NN, _SHAPE, _INDEX,
                                   _FACTORY, _MISC]).split()))
# In-place forms of elementwise ops that models write (``relu(inplace=True)``, ``x.add_``);
# the reader allows their mutation only on buffers and on tensors the program created.
CURATED_INPLACE = sorted({f"{op}_" for op in (_UNARY + " " + _BINARY).split()} | {
    "fill_", "zero_", "masked_fill_", "index_put_", "index_add_", "index_copy_", "index_fill_",
    "scatter_", "scatter_add_", "scatter_reduce_", "copy_", "tril_", "triu_", "clamp_",
    "clamp_min_", "clamp_max_", "uniform_", "normal_", "bernoulli_", "exponential_",
    "masked_scatter_", "unsqueeze_", "squeeze_", "transpose_", "t_"})

# -- what a pure operator may take ------------------------------------------------------------

#: Strings an operator may take: its enumerated values, per (op, argument). An op with a str
#: argument missing here is refused.
STR_ENUMS: dict[tuple[str, str], list[str]] = {
    ("gelu", "approximate"): ["none", "tanh"],
    ("gelu_", "approximate"): ["none", "tanh"],
    ("div", "rounding_mode"): ["trunc", "floor"],
    ("div_", "rounding_mode"): ["trunc", "floor"],
    ("scatter", "reduce"): ["add", "multiply"],
    ("scatter_", "reduce"): ["add", "multiply"],
    ("scatter_reduce", "reduce"): ["sum", "prod", "mean", "amax", "amin"],
    ("scatter_reduce_", "reduce"): ["sum", "prod", "mean", "amax", "amin"],
    ("pad", "mode"): ["constant", "reflect", "replicate", "circular"],
    ("conv1d", "padding"): ["same", "valid"],
    ("conv2d", "padding"): ["same", "valid"],
    ("conv3d", "padding"): ["same", "valid"],
    ("searchsorted", "side"): ["left", "right"],
    ("norm", "p"): ["fro", "nuc"],
}
#: Strings checked against a pattern instead of an enumeration (bounded length, no escapes).
STR_PATTERNS: dict[tuple[str, str], str] = {
    ("einsum", "equation"): r"[A-Za-z.,\- >]{1,256}",
}
_TYPES = re.compile(r"(Tensor|int|SymInt|float|bool|Scalar|ScalarType|Layout|Device|"
                    r"MemoryFormat|str|Generator)(\?)?(\[\d*\])?(\?)?")
_RETURN_TYPES = re.compile(r"(Tensor|int|SymInt|float|bool|Scalar)(\[\])?")
#: Operators refused whatever their schema says: effects outside the tensors they return.
DENY = {
    "from_file": "maps a file into a tensor", "save": "writes a file",
    "set_": "swaps a tensor's storage", "resize_": "reallocates a storage in place",
    "resize_as_": "reallocates a storage in place", "requires_grad_": "changes autograd state",
    "retain_grad": "changes autograd state",
    "_backward": "runs autograd", "backward": "runs autograd",
    "record_stream": "device-stream state", "_assert_async": "raises with a free-text message",
    "_assert_scalar": "raises with a free-text message", "_print": "prints",
    "share_memory_": "shares storage across processes", "pin_memory": "page-locks memory",
    "_pin_memory": "page-locks memory", "as_strided": "reads storage outside the view",
    "as_strided_": "reads storage outside the view", "set_data": "swaps a tensor's storage",
    "as_strided_scatter": "writes through arbitrary strides",
    "_copy_from": "writes another tensor's storage", "_copy_from_and_resize": "resizes",
    "_nested_tensor_from_mask": "nested",
    # Uninitialised memory holds whatever was freed there before (another input's data): a
    # program could hand it out as an output.
    **{op: "returns uninitialised memory" for op in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
        "empty_permuted")},
}
#: Ops that update arguments in place without saying so in their schema: which arguments,
#: and the flag that turns the update on (batch norm in training mode).
HIDDEN_MUTATIONS = {
    op: {"args": ["running_mean", "running_var"], "when": "training"}
    for op in ("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "instance_norm",
               "_batch_norm_impl_index", "cudnn_batch_norm", "miopen_batch_norm")
}
#: Arguments that set how many elements an op allocates, and the rule that counts them
#: (``graft.format.graph.requested_elements``); checked statically for literals, at run time
#: for symbolic sizes. ``None`` as the op: any op with an argument of that name.
SIZE_RULES: dict[tuple[str | None, str], str] = {
    (None, "size"): "shape", (None, "sizes"): "shape", (None, "output_size"): "shape",
    ("repeat", "repeats"): "repeats", ("repeat_interleave", "repeats"): "repeats",
    ("tile", "dims"): "repeats", ("linspace", "steps"): "count",
    ("logspace", "steps"): "count", ("eye", "n"): "eye", ("arange", "end"): "arange",
    ("tril_indices", "row"): "eye", ("triu_indices", "row"): "eye",
    **{(op, "pad"): "pad" for op in ("constant_pad_nd", "pad", "reflection_pad1d",
                                      "reflection_pad2d", "reflection_pad3d",
                                      "replication_pad1d", "replication_pad2d",
                                      "replication_pad3d")},
    **{(op, "scale_factors"): "scale" for op in ("upsample_nearest1d", "upsample_nearest2d",
                                                 "upsample_nearest3d", "upsample_linear1d",
                                                 "upsample_bilinear2d", "upsample_bicubic2d",
                                                 "upsample_trilinear3d",
                                                 "_upsample_nearest_exact1d",
                                                 "_upsample_nearest_exact2d",
                                                 "_upsample_nearest_exact3d",
                                                 "_upsample_bilinear2d_aa",
                                                 "_upsample_bicubic2d_aa")},
}


def _entry(name: str) -> tuple[dict[str, Any] | None, str]:
    """The operators.json entry of overload ``aten.op.overload``, or why it is refused."""
    import torch
    from torchgen.model import FunctionSchema

    namespace, op, overload = name.split(".")
    if op in DENY or op.startswith("_foreach"):
        return None, DENY.get(op, "mutates a list of tensors")
    if overload == "out" or overload.endswith("_out") or "Dimname" in overload:
        return None, "out= or named-dimension variant"
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
        schema = getattr(packet, overload)._schema
    except (AttributeError, RuntimeError):
        return None, "not in this torch"
    text = str(schema)
    # torchgen's grammar wants list defaults without spaces ("int[2] stride=[1,1]").
    native = re.sub(r"=\[([^\]]*)\]", lambda m: "=[" + m.group(1).replace(" ", "") + "]",
                    text.split("::", 1)[1])
    try:
        parsed = FunctionSchema.parse(native)
    except (RuntimeError, AssertionError) as exc:  # types outside the native-function grammar
        return None, f"schema outside the checked types ({exc})"
    args = []
    for arg in parsed.arguments.flat_all:
        kind = str(arg.type)
        if not _TYPES.fullmatch(kind):
            return None, f"argument {arg.name} has type {kind}"
        base = _TYPES.fullmatch(kind).group(1)
        entry: dict[str, Any] = {"name": arg.name, "type": kind}
        if arg.default is not None:
            entry["default"] = True
        if arg.name in {a.name for a in parsed.arguments.flat_kwarg_only}:
            entry["kwarg_only"] = True
        if arg.annotation is not None:
            if arg.annotation.is_write:
                if "[" in kind:
                    return None, f"mutates the list {arg.name}"
                if arg.name in {a.name for a in parsed.arguments.flat_kwarg_only}:
                    return None, "writes an out= argument"
                entry["mutable"] = True
            if arg.annotation.alias_set:
                entry["alias"] = arg.annotation.alias_set[0]
        if base == "str":
            key = (op, arg.name)
            if key in STR_ENUMS:
                entry["enum"] = STR_ENUMS[key]
            elif key in STR_PATTERNS:
                entry["pattern"] = STR_PATTERNS[key]
            else:
                return None, f"takes a free string {arg.name}"
        if base == "Generator" and not kind.endswith("?"):
            return None, "needs a random generator object"
        rule = SIZE_RULES.get((op, arg.name)) or SIZE_RULES.get((None, arg.name))
        if rule and base in ("int", "SymInt", "Scalar", "float"):
            entry["size"] = rule
        args.append(entry)
    hidden = HIDDEN_MUTATIONS.get(op)
    if hidden:
        for entry in args:
            if entry["name"] in hidden["args"]:
                entry["mutable"] = True
                entry["mutable_when"] = hidden["when"]
    returns = []
    for ret in parsed.returns:
        kind = str(ret.type)
        if not _RETURN_TYPES.fullmatch(kind):
            return None, f"returns {kind}"
        item: dict[str, Any] = {"type": kind}
        if ret.annotation is not None and ret.annotation.alias_set:
            item["alias"] = ret.annotation.alias_set[0]
        returns.append(item)
    tags = {str(t).removeprefix("Tag.") for t in getattr(getattr(packet, overload), "tags", ())}
    out = {"schema": text, "args": args, "returns": returns}
    if "nondeterministic_seeded" in tags:
        out["random"] = True
    return out, ""


def _overloads(op: str) -> list[str]:
    import torch

    return [f"aten.{op}.{s.overload_name or 'default'}"
            for s in torch._C._jit_get_schemas_for_operator(f"aten::{op}")]


# -- gathering: export models as graft.save does ----------------------------------------------


def _targets(ep: Any) -> set[str]:
    import torch

    from graft.runtime.program import PY_TARGETS

    by_function = {id(f): name for name, f in PY_TARGETS.items()}
    names = set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            names.add(f"{target.namespace}.{target._opname}.{target._overloadname}")
        elif id(target) in by_function:
            names.add(by_function[id(target)])
        else:
            names.add(f"python.{getattr(target, '__name__', target)}")
    return names


class _VariantFailed(Exception):
    """Some variants exported, others did not: the operators found, and why the rest failed."""

    def __init__(self, found: set[str], why: str) -> None:
        super().__init__(why)
        self.found = found


def _export_modes(model: Any, args: tuple, kwargs: dict, dynamic: Any) -> set[str]:
    """Every target the eval, train and frozen-batch-norm exports of ``model`` call."""
    import torch
    from torch import nn
    from torch.export import export

    found: set[str] = set()
    failed = []
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for variant in ("eval", "train", "train_frozen_bn")[: 3 if batch_norms else 2]:
        model.train(variant != "eval")
        if variant == "train_frozen_bn":
            for bn in batch_norms:
                bn.eval()
        try:
            ep = export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # torch raises many types; all mean "cannot export"
            failed.append(f"{variant}: {type(exc).__name__}: {exc}"[:300])
            continue
        found |= _targets(ep)
    model.eval()
    torch.manual_seed(0)
    if failed:
        raise _VariantFailed(found, "; ".join(failed))
    return found


def _sources() -> Iterable[tuple[str, Callable[[], set[str]]]]:
    import torch
    from torch.export import Dim

    from tests import conftest
    from graft.zoo.efficientnet import EfficientNetLite0
    from graft.zoo.minilm import MiniLM

    batch = {0: Dim.DYNAMIC}
    tokens = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},) * 2
    images = (torch.randn(2, 3, 16, 16),)
    ids, mask = conftest.token_batch(3, 7)
    word_ids = torch.randint(0, len(conftest.WORDS), (3, 7))

    class Method(torch.nn.Module):
        """One method of a model as ``forward``, as graft.save exports a signature."""

        def __init__(self, model: Any, method: str) -> None:
            super().__init__()
            self.model, self.method = model, method

        def forward(self, *args: Any) -> Any:
            return getattr(self.model, self.method)(*args)

    def method(model: Any, name: str, args: tuple, dynamic: Any) -> Callable[[], set[str]]:
        return lambda: _export_modes(Method(model, name), args, {}, (dynamic,))

    yield "tiny-cnn", method(conftest.TinyCNN(), "forward", images, (batch,))
    yield "tiny-cnn.features", method(conftest.TinyCNN(), "features", images, (batch,))
    yield "tiny-transformer", method(conftest.TinyTransformer(), "forward", (ids, mask), tokens)
    yield "tiny-transformer.tokens", method(conftest.TinyTransformer(), "token_states",
                                            (ids, mask), tokens)
    yield "bag-of-words", method(conftest.BagOfWords(), "forward", (word_ids, mask), tokens)
    yield "pool", method(conftest.Pool(), "features", images, (batch,))
    big = (torch.randn(2, 3, 224, 224),)
    yield "efficientnet-lite0", method(EfficientNetLite0(), "classify", big, (batch,))
    yield "efficientnet-lite0.features", method(EfficientNetLite0(), "features", big, (batch,))
    yield "minilm-l6", method(MiniLM(), "embed", (ids, mask), tokens)
    yield "minilm-l6.tokens", method(MiniLM(), "token_embeddings", (ids, mask), tokens)


def _corpus_sources() -> Iterable[tuple[str, Callable[[], set[str]]]]:
    from torch.export import Dim

    from tests.export.corpus import ENTRIES

    for entry in ENTRIES:
        def gather(entry: Any = entry) -> set[str]:
            model = entry.build()
            params = list(inspect.signature(model.forward).parameters)
            named = dict(zip(params, entry.args)) | dict(entry.kwargs)
            dims: dict[str, Any] = {}
            dynamic = {k: {axis: dims.setdefault(dim, Dim.AUTO) for axis, dim in
                           entry.dynamic.get(k, {}).items()} or None for k in named}
            return _export_modes(model, (), named, dynamic)
        yield entry.name, gather


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-corpus", action="store_true", help="skip the transformers corpus")
    parser.add_argument("--report", type=Path, help="write what each model needed, as JSON")
    parser.add_argument("--only", help="gather only these sources (comma-separated)")
    parser.add_argument("--reuse", type=Path, help="take every other source's operators from "
                                                   "an earlier --report instead of exporting")
    options = parser.parse_args()

    import torch

    from graft.format.operators import PY_FUNCTIONS

    sources: dict[str, list[str]] = {}
    failures: dict[str, str] = {}
    only = set(options.only.split(",")) if options.only else None
    if options.reuse:
        earlier = json.loads(options.reuse.read_text(encoding="utf-8"))
        sources.update(earlier["sources"])
        failures.update(earlier["export_failures"])
    all_sources = list(_sources()) + ([] if options.no_corpus else list(_corpus_sources()))
    for source, gather in all_sources:
        if (only is not None and source not in only) or (only is None and options.reuse):
            continue
        print(f"exporting {source} ...", flush=True)
        sources.pop(source, None)
        failures.pop(source, None)
        try:
            sources[source] = sorted(gather())
        except _VariantFailed as exc:
            sources[source] = sorted(exc.found)
            failures[source] = f"torch.export failed for {exc}"[:800]
        except Exception as exc:  # torch raises many types; all mean "cannot export"
            failures[source] = f"torch.export failed: {type(exc).__name__}: {exc}"[:500]
            traceback.print_exc(limit=1)

    wanted: dict[str, set[str]] = {}
    for source, names in sources.items():
        for name in names:
            wanted.setdefault(name, set()).add(source)
    for op in CURATED_OPS + CURATED_INPLACE:
        for name in _overloads(op):
            wanted.setdefault(name, set()).add("curated")

    operators: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for name in sorted(wanted):
        if name in PY_FUNCTIONS:
            continue
        if not name.startswith(("aten.", "prims.")):
            refused[name] = "not an ATen operator"
            continue
        entry, why = _entry(name)
        if entry is None:
            refused[name] = why
            continue
        operators[name] = entry
    needed_refused = {n: refused[n] for n in refused if wanted[n] != {"curated"}}
    document = {
        "format": "graft.operators/1",
        "graph_format": "graft.graph/1",
        "generated_with": f"torch {torch.__version__} by scripts/operators.py",
        "operators": operators,
    }
    OUT.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(operators)} operators to {OUT.relative_to(ROOT)}")
    for name, why in sorted(needed_refused.items()):
        print(f"  refused {name} (needed by {sorted(wanted[name])}): {why}")
    for source, why in failures.items():
        print(f"  could not export {source}: {why}")
    if options.report:
        options.report.write_text(json.dumps({
            "sources": sources, "export_failures": failures, "refused": needed_refused,
        }, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
