"""Modules on OCI registries: references, the artifact mapping, push, pull and login.

See docs/registry.md for the mapping, precise enough for another client to implement.
"""

from graft.hub.oci.login import login
from graft.hub.oci.pull import pull
from graft.hub.oci.push import PushResult, push
from graft.hub.oci.reference import Reference, parse_reference

__all__ = ["PushResult", "Reference", "login", "parse_reference", "pull", "push"]
