"""``graft.data``: labelled datasets, deterministic splits, collation and the feature cache.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose items are
``(example, label)``: the example is raw (a PIL image, an image array, a string) unless a
``transform`` turns it into a tensor, and the label is an ``int`` index into ``.classes``.
Each dataset also exposes ``.labels`` (one int per item), so splitting and stratified
sampling never load an example. The Estimator owns shuffling, sampling and batching (and
streams ``IterableDataset``\\ s, see ``docs/training.md``); this package owns what is in the
data. Where each piece lives:

* ``image_folder.py`` (:class:`ImageFolder`), ``text_table.py`` (:class:`TextTable`),
  ``arrays.py`` (:class:`ArrayDataset`): datasets;
* ``splits.py``: :func:`split`, :func:`few_shot`, :class:`LabeledSubset`;
* ``collation.py``: :func:`module_collate` and friends (raw items -> a signature's inputs);
* ``fingerprints.py``: content digests; ``feature_cache.py``: :class:`FeatureCache`;
* ``labels.py``: reading ``.classes`` / ``.labels`` of any dataset.
"""

from graft.data.arrays import ArrayDataset
from graft.data.collation import (
    ModuleCollate,
    collate_images,
    collate_text,
    module_collate,
    module_transform,
)
from graft.data.feature_cache import CachedFeatures, FeatureCache
from graft.data.fingerprints import content_sha256, example_sha256
from graft.data.image_folder import IMAGE_EXTENSIONS, ImageFolder
from graft.data.labels import classes_of, labels_of
from graft.data.splits import LabeledSubset, few_shot, split
from graft.data.text_table import TextTable

__all__ = [
    "ArrayDataset",
    "CachedFeatures",
    "FeatureCache",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "LabeledSubset",
    "ModuleCollate",
    "TextTable",
    "classes_of",
    "collate_images",
    "collate_text",
    "content_sha256",
    "example_sha256",
    "few_shot",
    "labels_of",
    "module_collate",
    "module_transform",
    "split",
]
