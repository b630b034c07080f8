"""The semantic side of the training-free pipeline: reference memory bank, prototypes, mask
resampling and pooling, and the prototype classifier with its semantic-aware merge.

See DESIGN.md, "Data flow of the training-free pipeline".
"""
from . import classifier, mask_ops, memory_bank, text_prototypes
from . import clip_recognition
from . import open_vocab_classifier
from . import labeller
from .classifier import *  # noqa: F401,F403  (the names of its __all__)
from .mask_ops import *  # noqa: F401,F403
from .memory_bank import *  # noqa: F401,F403
from .text_prototypes import *  # noqa: F401,F403
from .clip_recognition import *  # noqa: F401,F403
from .open_vocab_classifier import *  # noqa: F401,F403
from .labeller import *  # noqa: F401,F403

__all__ = [*classifier.__all__, *mask_ops.__all__, *memory_bank.__all__, *text_prototypes.__all__, *clip_recognition.__all__,
           *open_vocab_classifier.__all__, *labeller.__all__]
