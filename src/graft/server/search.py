"""Search and listings over the module index, shared by the JSON API, the pages and
``graft search``.

A query is words; a module matches when every word does. A plain word matches the name,
repository, description, a signature's name or input/output specs, or a parent's handle
(case-insensitive substring). ``name:``, ``input:``, ``output:`` and ``parent:`` restrict a
word to one field, e.g. ``input:float32[batch,3,224,224] parent:efficientnet``. Results are the
latest version of each repository that is not yanked, in namespaces the caller may read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from graft.format.manifest import Manifest
from graft.server.db import Database
from graft.server.registry import version_key

__all__ = ["ModuleSummary", "latest", "module_detail", "namespace_modules", "search"]

_FIELDS = ("name", "input", "output", "parent")
#: Longest query accepted, in characters.
MAX_QUERY = 500


@dataclass(frozen=True)
class ModuleSummary:
    """One repository's latest version, as listings show it."""

    repo: str
    name: str
    version: str
    description: str
    digest: str
    manifest: str
    created: str
    signatures: list[tuple[str, str, str]] = field(default_factory=list)
    parents: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"repository": self.repo, "name": self.name, "version": self.version,
                "description": self.description, "digest": self.digest,
                "manifest": self.manifest, "created": self.created,
                "signatures": [{"name": s, "inputs": i, "outputs": o}
                               for s, i, o in self.signatures],
                "parents": [{"handle": h, "digest": d} for h, d in self.parents]}

    def matches(self, term: str) -> bool:
        key, sep, value = term.partition(":")
        if sep and key in _FIELDS:
            field_values = self._fields(key)
            term = value
        else:
            field_values = [*self._fields("name"), self.description,
                            *self._fields("input"), *self._fields("output"),
                            *self._fields("parent"), *(s for s, _, _ in self.signatures)]
        term = term.lower()
        return any(term in v.lower() for v in field_values)

    def _fields(self, key: str) -> list[str]:
        if key == "name":
            return [self.name, self.repo]
        if key == "input":
            return [i for _, i, _ in self.signatures]
        if key == "output":
            return [o for _, _, o in self.signatures]
        return [h for h, _ in self.parents] + [d for _, d in self.parents]


def _visible(repo: str, private: set[str], reader: str | None) -> bool:
    namespace = repo.split("/", 1)[0]
    return namespace not in private or namespace == reader


def latest(db: Database, reader: str | None = None,
           namespace: str | None = None) -> list[ModuleSummary]:
    """The latest unyanked version of every visible repository, newest first."""
    private = {r[0] for r in db.rows("SELECT name FROM namespaces WHERE private = 1")}
    rows = db.rows("SELECT * FROM modules WHERE yanked = 0")
    best: dict[str, Any] = {}
    for row in rows:
        if namespace is not None and not row["repo"].startswith(namespace + "/"):
            continue
        if not _visible(row["repo"], private, reader):
            continue
        held = best.get(row["repo"])
        if held is None or version_key(row["version"]) > version_key(held["version"]):
            best[row["repo"]] = row
    summaries = [_summary(db, row) for row in best.values()]
    summaries.sort(key=lambda s: (s.created, s.repo), reverse=True)
    return summaries


def _summary(db: Database, row: Any) -> ModuleSummary:
    sigs = db.rows("SELECT signature, inputs, outputs FROM module_signatures WHERE repo = ? "
                   "AND version = ? ORDER BY signature", row["repo"], row["version"])
    parents = db.rows("SELECT handle, digest FROM module_parents WHERE repo = ? AND "
                      "version = ?", row["repo"], row["version"])
    return ModuleSummary(row["repo"], row["name"], row["version"], row["description"],
                         row["module_digest"], row["manifest"], row["created"],
                         [tuple(s) for s in sigs], [tuple(p) for p in parents])


def search(db: Database, query: str, reader: str | None = None,
           limit: int = 50) -> list[ModuleSummary]:
    """Modules matching every word of ``query`` (see the module docstring)."""
    terms = query[:MAX_QUERY].split()
    found = [m for m in latest(db, reader) if all(m.matches(t) for t in terms)]
    return found[:limit]


def namespace_modules(db: Database, namespace: str,
                      reader: str | None = None) -> list[ModuleSummary]:
    return latest(db, reader, namespace=namespace)


def module_detail(db: Database, repo: str, version: str | None = None,
                  reader: str | None = None) -> dict[str, Any] | None:
    """Everything the module page shows, or None if ``repo`` has no visible module.

    ``version`` picks one version; default the latest unyanked one (or the latest yanked one
    when every version is yanked).
    """
    private = {r[0] for r in db.rows("SELECT name FROM namespaces WHERE private = 1")}
    if not _visible(repo, private, reader):
        return None
    rows = db.rows("SELECT * FROM modules WHERE repo = ?", repo)
    if not rows:
        return None
    rows.sort(key=lambda r: version_key(r["version"]), reverse=True)
    if version is not None:
        chosen = next((r for r in rows if r["version"] == version), None)
        if chosen is None:
            return None
    else:
        chosen = next((r for r in rows if not r["yanked"]), rows[0])
    # The config was validated by Manifest at push; it is read back the same way.
    manifest = Manifest.from_json(json.loads(chosen["config"]))
    digests = [r["module_digest"] for r in rows]
    return {
        "repo": repo,
        "row": chosen,
        "manifest": manifest,
        "versions": [{"version": r["version"], "yanked": bool(r["yanked"]),
                      "digest": r["module_digest"], "manifest": r["manifest"],
                      "created": r["created"]} for r in rows],
        "parents": _parents(db, manifest, private, reader),
        "children": _children(db, digests, private, reader),
    }


def _parents(db: Database, manifest: Manifest, private: set[str],
             reader: str | None) -> list[dict[str, Any]]:
    out = []
    for parent in manifest.parents:
        row = db.row("SELECT repo, version FROM modules WHERE module_digest = ? LIMIT 1",
                     parent.digest)
        known = row is not None and _visible(row["repo"], private, reader)
        out.append({"handle": parent.handle, "digest": parent.digest,
                    "repo": row["repo"] if known else None,
                    "version": row["version"] if known else None})
    return out


def _children(db: Database, digests: Iterable[str], private: set[str],
              reader: str | None) -> list[dict[str, Any]]:
    digests = list(digests)
    if not digests:
        return []
    marks = ",".join("?" * len(digests))
    rows = db.rows(f"SELECT DISTINCT p.repo, p.version, m.name FROM module_parents p JOIN "
                   f"modules m ON m.repo = p.repo AND m.version = p.version WHERE "
                   f"p.digest IN ({marks}) ORDER BY p.repo, p.version", *digests)
    return [{"repo": r["repo"], "version": r["version"], "name": r["name"]} for r in rows
            if _visible(r["repo"], private, reader)]
