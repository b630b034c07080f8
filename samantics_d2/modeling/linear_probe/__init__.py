"""Linear probing of frozen encoders: feature cache, grid trainer and the ``LinearProbe`` meta-architecture."""
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
    PAPER_PROTOCOL,
    CachedFeatures,
    EncoderFeatures,
    LinearProbe,
    ProbeGridOutput,
    ProbeTrainingConfig,
    holdout_split,
    run_linear_probe,
    train_probe_grid,
)

__all__ = [
    "GRID_PROTOCOL",
    "PAPER_PROTOCOL",
    "POOLINGS",
    "CachedFeatures",
    "EncoderFeatures",
    "FeatureCache",
    "LinearProbe",
    "PooledEncoder",
    "ProbeGridOutput",
    "ProbeTrainingConfig",
    "build_feature_cache",
    "dataset_fingerprint",
    "feature_cache_dir",
    "holdout_split",
    "module_fingerprint",
    "pool_features",
    "run_linear_probe",
    "train_probe_grid",
]
