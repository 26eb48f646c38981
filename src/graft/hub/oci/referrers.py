"""A module's children on a registry: the OCI 1.1 referrers API, or its tag-schema fallback.

A registry with the referrers API answers ``GET /v2/<repo>/referrers/<digest>`` with an image
index of the manifests whose ``subject`` is that digest, and says so on a manifest PUT with an
``OCI-Subject`` header. One without it (CNCF distribution 2.8) gets the fallback the OCI 1.1
distribution spec defines: the client keeps that index itself, under the tag
``sha256-<hex of the subject digest>``, adding each child's descriptor when it pushes one.
"""

from __future__ import annotations

from typing import Any

from graft.errors import FormatError, ModuleNotFound
from graft.format import jsonio
from graft.format.manifest import canonical_json
from graft.hub.oci.artifact import ARTIFACT_TYPE, INDEX_TYPE, MAX_MANIFEST, Descriptor
from graft.hub.oci.client import RegistryClient

__all__ = ["add_referrer", "children_lines", "fallback_tag", "referrers"]


def fallback_tag(digest: str) -> str:
    """The tag of the referrers index of ``digest`` (``sha256:<hex>`` -> ``sha256-<hex>``)."""
    return digest.replace(":", "-", 1)


def referrers(client: RegistryClient, repository: str, digest: str) -> list[Descriptor]:
    """The Graft modules whose ``subject`` is the manifest ``digest`` in ``repository``."""
    scope = f"repository:{repository}:pull"
    response = client.request("GET", f"/v2/{repository}/referrers/{digest}", scope=scope,
                              allow=(404, 400, 405), params={"artifactType": ARTIFACT_TYPE},
                              headers={"Accept": INDEX_TYPE})
    if response.status_code != 200 or "json" not in response.headers.get("content-type", ""):
        index = _fallback_index(client, repository, digest)
    else:
        index = _parse_index(response.content, f"the referrers of {digest}")
    return [d for d in index if d.artifact_type == ARTIFACT_TYPE]


def add_referrer(client: RegistryClient, repository: str, subject: str,
                 child: Descriptor) -> None:
    """Add ``child`` to the fallback referrers index of ``subject`` (read, add, put)."""
    index = [d for d in _fallback_index(client, repository, subject) if d.digest != child.digest]
    index.append(child)
    body = canonical_json({"schemaVersion": 2, "mediaType": INDEX_TYPE,
                           "manifests": [d.to_json() for d in index]})
    client.request("PUT", f"/v2/{repository}/manifests/{fallback_tag(subject)}",
                   scope=f"repository:{repository}:pull,push", ok=(201,), content=body,
                   headers={"Content-Type": INDEX_TYPE})


def _fallback_index(client: RegistryClient, repository: str, digest: str) -> list[Descriptor]:
    try:
        response = client.request("GET", f"/v2/{repository}/manifests/{fallback_tag(digest)}",
                                  scope=f"repository:{repository}:pull",
                                  headers={"Accept": INDEX_TYPE})
    except ModuleNotFound:
        return []
    return _parse_index(response.content, f"the referrers index {fallback_tag(digest)}")


def _parse_index(data: bytes, what: str) -> list[Descriptor]:
    body = jsonio.loads(data, what=what, max_bytes=MAX_MANIFEST)
    manifests = body.get("manifests") if isinstance(body, dict) else None
    if not isinstance(manifests, list):
        raise FormatError(f"{what} is not an OCI image index")
    return [Descriptor.from_json(m, f"{what}: entry {i}") for i, m in enumerate(manifests)]


def children_lines(cache: Any, module_digest: str) -> list[str]:
    """``oci://...`` references of the known children of a module, for ``graft inspect``;
    empty offline, or where no registry is known or answers."""
    from graft.errors import GraftError
    from graft.settings import offline

    if offline():
        return []
    lines = []
    for place in cache.locations(module_digest):
        try:
            with RegistryClient(place["registry"], retries=0, timeout=5.0) as client:
                for d in referrers(client, place["repository"], place["manifest"]):
                    title = d.annotations.get("org.opencontainers.image.title", "?")
                    version = d.annotations.get("org.opencontainers.image.version", "?")
                    lines.append(f"{title} {version}  oci://{place['registry']}/"
                                 f"{place['repository']}@{d.digest}")
        except (GraftError, KeyError, TypeError):
            continue  # a registry that does not answer shows no children
    return lines
