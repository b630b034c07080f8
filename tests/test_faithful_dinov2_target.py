"""Issue 13, deviation 4: No Time to Train's DINOv2 target input, pinned on hand-made images.

Their steps, transcribed here (not our code): the target is loaded by sam2's
``_load_img_as_tensor`` (``Image.open(...).convert("RGB").resize((1024, 1024))``: PIL's default
bicubic, aspect ratio ignored; ``/ 255.0``), ``no_time_to_train/dataset/coco_ref_dataset.py``
casts it to float32, and ``Sam2MatchingBaselineNoAMG.forward_test`` resizes that tensor with
``F.interpolate(tar_img[None], size=(518, 518), mode="bicubic")`` before ``encoder_transform``
(ImageNet ``Normalize``). The faithful config (``configs/common/training_free.py``) must give the
same DINOv2 input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import Normalize

from samantics_d2.d2 import LazyConfig, instantiate
from samantics_d2.modeling.preprocess import preprocess_spec
from samantics_d2.modeling.semantic import MemoryBankConfig
from samantics_d2.modeling.semantic.memory_bank import reference_preprocess


def _their_dinov2_target(image: np.ndarray, sam_size: int = 1024, encoder_size: int = 518) -> torch.Tensor:
    img_np = np.array(Image.fromarray(image).convert("RGB").resize((sam_size, sam_size))) / 255.0
    tar_img = torch.from_numpy(img_np).permute(2, 0, 1).to(torch.float32)
    tar_img_encoder = F.interpolate(tar_img.unsqueeze(dim=0), size=(encoder_size, encoder_size), mode="bicubic")
    return Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(tar_img_encoder)[0]


def _hand_made(height: int, width: int) -> np.ndarray:
    """Sharp edges (where bicubic overshoots), a gradient and noise."""
    rng = np.random.default_rng(height * 1000 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 3] = (255, 0, 0)
    image[height // 2 :, width // 3 :, 1] = np.linspace(0, 255, width - width // 3, dtype=np.uint8)
    image[height // 3, :] = 0
    return image


def _faithful_semantic_encoder(**overrides):
    """The faithful config's semantic encoder, as tiny random weights (the preprocessing is the config's)."""
    cfg = LazyConfig.load("configs/common/training_free.py")
    node = cfg.model.semantic_encoder
    node.size, node.pretrained = "tiny", False
    for key, value in overrides.items():
        setattr(node, key, value)
    return instantiate(node)


@pytest.mark.parametrize("shape", [(48, 80), (131, 97), (1024, 1024), (1200, 700)])
def test_faithful_dinov2_target_input_is_theirs(shape):
    encoder = _faithful_semantic_encoder()
    image = _hand_made(*shape)
    x, (fit,) = encoder.prepare_with_fits([image])
    theirs = _their_dinov2_target(image)
    assert x.shape == (1, 3, 518, 518)
    torch.testing.assert_close(x[0], theirs, rtol=0, atol=2e-5)  # float rounding only (ours: 0-255 scale)
    assert fit.scale == (518 / shape[0], 518 / shape[1]) and fit.valid_box == (0, 0, 518, 518)


def test_one_step_resize_is_not_theirs():
    """The two steps matter: the one-step variants (our former default) differ by whole grey levels."""
    image = _hand_made(131, 97)
    theirs = _their_dinov2_target(image)
    for options in ({"pre_resize": None}, {"pre_resize": None, "interpolation": "bicubic"}):
        x, _ = _faithful_semantic_encoder(**options).prepare_with_fits([image])
        assert (x[0] - theirs).abs().max() > 0.05  # > ~3 grey levels somewhere


def test_pre_resize_follows_the_sam_input_and_stays_off_the_reference_crops():
    cfg = LazyConfig.load("configs/training_free/shapes_tiny_random.py")
    encoder = instantiate(cfg.model.semantic_encoder)
    assert encoder.preprocess.pre_resize == (64, "pil_bicubic")  # its SAM's input size
    assert reference_preprocess(encoder, MemoryBankConfig(crop="square_clipped")).pre_resize is None
    assert reference_preprocess(encoder, MemoryBankConfig(crop="full")).pre_resize == (64, "pil_bicubic")


def test_pre_resize_is_checked():
    with pytest.raises(ValueError, match="pre_resize goes with fit='resize_square'"):
        preprocess_spec("dinov2_vits14", pre_resize=(1024, "pil_bicubic"))  # the tag's centre crop
    with pytest.raises(ValueError, match="must be \\(size > 0, interpolation\\)"):
        preprocess_spec("dinov2_vits14", fit="resize_square", pre_resize=(1024, "bicubic_float"))
