"""Models: encoder backbones, their weights and preprocessing (and, in later modules, the
proposal, semantic and RefSAM parts and the meta-architectures)."""
from . import backbone, preprocess, weights  # noqa: F401  (registers the backbones)
from .backbone import EncoderBackbone, build_encoder  # noqa: F401
from .preprocess import PreprocessSpec, fit_image, preprocess_spec  # noqa: F401
from .weights import load_encoder_weights  # noqa: F401
