"""Linear probing of frozen encoders: feature cache, feature sources and the ``LinearProbe`` meta-architecture
(the grid trainer, an evaluation protocol, is :mod:`samantics_d2.evaluation.linear_probe`)."""
from .feature_cache import (
    POOLINGS,
    FeatureCache,
    PooledEncoder,
    build_feature_cache,
    dataset_fingerprint,
    feature_cache_dir,
    module_fingerprint,
    pool_features,
)
from .probe import (
    GRID_PROTOCOL,
    HEAD_INITS,
    OUR_PROTOCOL,
    PAPER_PROTOCOL,
    CachedFeatures,
    EncoderFeatures,
    LinearProbe,
    ProbeTrainingConfig,
    holdout_split,
)

__all__ = [
    "GRID_PROTOCOL",
    "HEAD_INITS",
    "OUR_PROTOCOL",
    "PAPER_PROTOCOL",
    "POOLINGS",
    "CachedFeatures",
    "EncoderFeatures",
    "FeatureCache",
    "LinearProbe",
    "PooledEncoder",
    "ProbeTrainingConfig",
    "build_feature_cache",
    "dataset_fingerprint",
    "feature_cache_dir",
    "holdout_split",
    "module_fingerprint",
    "pool_features",
]
