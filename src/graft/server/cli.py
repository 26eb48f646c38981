"""The ``graft serve`` commands: run the server, create tokens, make namespaces private, yank.

``graft.cli`` registers these with :func:`register` and dispatches to them; nothing here runs
at import, so ``graft --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from graft._extras import require
from graft.errors import GraftError, RequestRefused

__all__ = ["cmd_serve", "register_serve"]


def _root(args: argparse.Namespace) -> Path:
    from graft.settings import graft_home

    if getattr(args, "root", None):
        return Path(args.root).expanduser()
    # An upstream's index never shares a root with a registry's own blobs and rows.
    return graft_home() / ("serve-index" if getattr(args, "upstream", None) else "serve")


def _database(args: argparse.Namespace) -> Any:
    from graft.server.config import ServeConfig
    from graft.server.db import Database

    config = ServeConfig(_root(args))
    config.root.mkdir(parents=True, exist_ok=True)
    return Database(config.database)


def _refused(exc: RequestRefused) -> GraftError:
    return GraftError(str(exc))


def cmd_serve(args: argparse.Namespace) -> None:
    """``graft serve``: run the registry (or the pages in front of ``--upstream``)."""
    sub = getattr(args, "serve_command", None)
    if sub == "token":
        return _token_create(args)
    if sub == "namespace":
        return _namespace(args)
    if sub == "yank":
        return _yank(args)
    for module in ("starlette", "uvicorn", "jinja2", "markdown_it", "nh3"):
        require(module, "serve", "`graft serve`")
    import uvicorn

    from graft.server.app import create_app
    from graft.server.config import ServeConfig

    if args.upstream and not args.upstream.startswith("oci://"):
        raise GraftError(f"--upstream {args.upstream!r} must be oci://HOST[:PORT][/NAMESPACE]")
    if args.max_upload_bytes is not None and args.max_upload_bytes < 1:
        raise GraftError("--max-upload-bytes must be a positive number of bytes")
    config = ServeConfig(root=_root(args), upstream=args.upstream,
                         public_host=args.public_host,
                         **({"max_upload": args.max_upload_bytes}
                            if args.max_upload_bytes else {}))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    app = create_app(config)
    print(f"graft serve: {'pages for ' + args.upstream if args.upstream else config.root} on "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    # access_log=False: uvicorn's own access log would print query strings; ours does not.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info",
                server_header=False, timeout_graceful_shutdown=5)


def _token_create(args: argparse.Namespace) -> None:
    from graft.server.auth import create_token, set_private

    db = _database(args)
    try:
        token = create_token(db, args.namespace, args.scope)
        if args.private:
            set_private(db, args.namespace, True)
    except RequestRefused as exc:
        raise _refused(exc) from None
    print(f"created a {args.scope} token for namespace {args.namespace}"
          f"{' (now private)' if args.private else ''}; it is shown only this once:")
    print(token)


def _namespace(args: argparse.Namespace) -> None:
    from graft.server.auth import set_private

    try:
        set_private(_database(args), args.namespace, args.visibility == "private")
    except RequestRefused as exc:
        raise _refused(exc) from None
    print(f"namespace {args.namespace} is {args.visibility}")


def _yank(args: argparse.Namespace) -> None:
    from graft.server.config import ServeConfig
    from graft.server.names import check_repository
    from graft.server.registry import Registry

    try:
        registry = Registry(ServeConfig(_root(args)))
        digest = registry.yank(check_repository(args.repository), args.version, not args.undo)
    except RequestRefused as exc:
        raise _refused(exc) from None
    print(f"{'un' if args.undo else ''}yanked {args.repository}:{args.version} ({digest})")


def register_serve(sub: Any, add: Any) -> None:
    """Add ``graft serve`` and its subcommands to the ``graft`` parser."""
    p = add("serve", cmd_serve, "Run a module registry: the OCI distribution API over "
            "content-addressed blobs and SQLite, tokens, search and web pages.")
    p.add_argument("--root", help="where blobs and the database live (default "
                   "$GRAFT_HOME/serve; with --upstream, $GRAFT_HOME/serve-index)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--upstream", help="oci://HOST[:PORT][/NAMESPACE]: show pages and search for "
                   "an existing OCI registry, which holds the bytes")
    p.add_argument("--public-host", help="HOST[:PORT] the pages' copy line names (default: the "
                   "request's Host)")
    p.add_argument("--max-upload-bytes", type=int, default=None,
                   help="largest blob accepted (default 8 GiB); larger uploads get 413")
    serve = p.add_subparsers(dest="serve_command", metavar="SUBCOMMAND")
    root = {"default": argparse.SUPPRESS, "help": "the server root (as for graft serve)"}
    token = serve.add_parser("token", help="Manage tokens.").add_subparsers(
        dest="token_command", required=True, metavar="ACTION")
    create = token.add_parser("create", help="Create a token; it is printed once, on the last "
                              "line, and stored only hashed.")
    create.add_argument("--root", **root)
    create.add_argument("--namespace", required=True, help="the namespace the token owns")
    create.add_argument("--scope", choices=("pull", "push"), default="push")
    create.add_argument("--private", action="store_true", help="also make the namespace "
                        "private (pulls need one of its tokens)")
    ns = serve.add_parser("namespace", help="Make a namespace private or public.")
    ns.add_argument("namespace")
    ns.add_argument("visibility", choices=("private", "public"))
    ns.add_argument("--root", **root)
    yank = serve.add_parser("yank", help="Hide a version from 'latest' (still pullable by "
                            "digest and exact version).")
    yank.add_argument("repository", help="NAMESPACE/NAME")
    yank.add_argument("version")
    yank.add_argument("--undo", action="store_true", help="show the version again")
    yank.add_argument("--root", **root)
