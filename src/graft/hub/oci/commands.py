"""The ``graft push``, ``pull``, ``login`` and ``diff`` commands (cli.py registers them)."""

from __future__ import annotations

import argparse
import getpass
import sys

from graft.errors import RegistryAuthError

__all__ = ["children", "diff", "login", "pull", "push"]


def push(args: argparse.Namespace) -> None:
    from graft.hub.oci.push import push as push_module

    result = push_module(args.handle, args.reference)
    print(f"pushed {result.reference} (tag {result.tag}; module {result.module_digest}): "
          f"{result.uploaded} blobs uploaded, {result.mounted} mounted, {result.present} "
          f"already there, {_human(result.bytes_sent)} sent"
          + (f"; parent {result.subject}" if result.subject else ""))


def pull(args: argparse.Namespace) -> None:
    from graft.hub.oci.pull import pull as pull_module

    stored = pull_module(args.reference)
    print(f"{stored.name}@{stored.version} {stored.digest}")


def login(args: argparse.Namespace) -> None:
    from graft.hub.oci.login import login as login_registry

    username = args.username or input("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise RegistryAuthError("graft login reads the password from a terminal; pipe it "
                                    "with --password-stdin instead")
        password = getpass.getpass("Password: ")
    path = login_registry(args.host, username, password, verify=not args.no_verify)
    print(f"login to {args.host} as {username} succeeded; credentials kept in {path} "
          "(mode 0600)")


def diff(args: argparse.Namespace) -> None:
    from graft.hub.diff import diff_modules

    print(diff_modules(args.a, args.b).render())


def children(module_digest: str) -> list[str]:
    """Lines naming the known children of a module on registries (for ``graft inspect``)."""
    from graft.hub.oci.cache import BlobCache
    from graft.hub.oci.referrers import children_lines
    from graft.hub.store import Store

    return children_lines(BlobCache(Store().root), module_digest)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
