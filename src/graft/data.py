"""``graft.data``: datasets, splits, collation and the feature cache for training."""

from graft.train.data import (
    ArrayDataset,
    ImageFolder,
    LabeledSubset,
    TextTable,
    collate_images,
    collate_text,
    few_shot,
    module_collate,
    module_transform,
    split,
)
from graft.train.feature_cache import CachedFeatures, FeatureCache

__all__ = [
    "ArrayDataset",
    "CachedFeatures",
    "FeatureCache",
    "ImageFolder",
    "LabeledSubset",
    "TextTable",
    "collate_images",
    "collate_text",
    "few_shot",
    "module_collate",
    "module_transform",
    "split",
]
