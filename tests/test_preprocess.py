"""Preprocessing: the constants table, each fitting mode against the upstream pipelines, odd
images (gray, RGBA, 16-bit, 5x300, huge), clear rejections, and mapping results back."""
from __future__ import annotations

import inspect
import types

import numpy as np
import pytest
import torch

import samantics_d2.modeling.preprocess as preprocess_module
from samantics_d2.modeling.preprocess import (
    FIT_MODES,
    PREPROCESS,
    ImageFit,
    PreprocessSpec,
    fit_image,
    prepare_batch,
    preprocess_spec,
)
from samantics_d2.modeling.weights import WEIGHTS


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients plus a flat rectangle: what resampling kernels agree on, with sharp edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([127 + 100 * np.sin(x / 17.0 + c) + 20 * np.cos(y / 11.0 * (c + 1)) for c in range(3)], -1)
    image[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _levels(a: torch.Tensor, b: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """|a - b| of two normalised images, in 0-255 grey levels."""
    return ((a - b) * torch.tensor(spec.pixel_std).view(-1, 1, 1)).abs()


def test_table_covers_every_tag_with_upstream_constants():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from segment_anything.modeling import Sam
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert set(PREPROCESS) == set(WEIGHTS)
    sam_defaults = inspect.signature(Sam.__init__).parameters
    expected = {
        "sam": (sam_defaults["pixel_mean"].default, sam_defaults["pixel_std"].default, 1024, 16, "longest_side_pad"),
        "hq_sam": (sam_defaults["pixel_mean"].default, sam_defaults["pixel_std"].default, 1024, 16, "longest_side_pad"),
        # sam2.utils.transforms.SAM2Transforms: ImageNet statistics on [0, 1], Resize((1024, 1024))
        "sam2": ([m * 255 for m in IMAGENET_DEFAULT_MEAN], [s * 255 for s in IMAGENET_DEFAULT_STD], 1024, 16, "resize_square"),
        "dinov2": ([m * 255 for m in IMAGENET_DEFAULT_MEAN], [s * 255 for s in IMAGENET_DEFAULT_STD], 224, 14, "resize_center_crop"),
        "clip": ([m * 255 for m in OPENAI_DATASET_MEAN], [s * 255 for s in OPENAI_DATASET_STD], None, None, "resize_center_crop"),
        # open_clip's pretrained configs of RN50x16 (openai) and ConvNeXt-L-D 320 (laion2b): OpenAI's statistics
        "clip_resnet": ([m * 255 for m in OPENAI_DATASET_MEAN], [s * 255 for s in OPENAI_DATASET_STD], 384, 32, "resize_center_crop"),
        "clip_convnext": ([m * 255 for m in OPENAI_DATASET_MEAN], [s * 255 for s in OPENAI_DATASET_STD], 320, 32, "resize_center_crop"),
    }
    for tag, spec in PREPROCESS.items():
        mean, std, size, patch, fit = expected[WEIGHTS[tag].family]
        assert spec.tag == tag and spec.fit == fit
        np.testing.assert_allclose(spec.pixel_mean, mean, rtol=1e-6)
        np.testing.assert_allclose(spec.pixel_std, std, rtol=1e-6)
        if size is not None:
            assert (spec.input_size, spec.patch_size) == (size, patch)
    assert preprocess_spec("dinov2_vits14").crop_pct == 0.875  # DINOv2's eval: Resize(256) + CenterCrop(224)
    assert preprocess_spec("clip_vit_l14_336_openai").input_size == 336


@pytest.mark.parametrize("shape", [(300, 420, 3), (5, 300, 3), (700, 2, 3), (1500, 1100, 3)])
def test_longest_side_pad_matches_segment_anything(shape):
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    image = _smooth_image(*shape[:2])
    spec = preprocess_spec("sam_vit_b")
    resize = ResizeLongestSide(1024)
    defaults = inspect.signature(Sam.__init__).parameters
    sam_like = types.SimpleNamespace(  # what Sam.preprocess reads from self
        pixel_mean=torch.tensor(defaults["pixel_mean"].default).view(-1, 1, 1),
        pixel_std=torch.tensor(defaults["pixel_std"].default).view(-1, 1, 1),
        image_encoder=types.SimpleNamespace(img_size=1024),
    )
    resized = torch.from_numpy(resize.apply_image(image)).permute(2, 0, 1).float()[None]
    expected = Sam.preprocess(sam_like, resized)[0]
    batch, fits = prepare_batch([image], spec)
    diff = _levels(batch[0], expected, spec)
    assert diff.max() <= 2.01 and diff.mean() < 0.05  # PIL vs torch bilinear: at most rounding
    h, w = resize.get_preprocess_shape(shape[0], shape[1], 1024)
    assert fits[0].valid_box == (0, 0, w, h)
    assert (batch[0][:, h:, :] == 0).all() and (batch[0][:, :, w:] == 0).all()  # padding after normalising
    points = np.array([[0.0, 0.0], [shape[1] - 1.0, shape[0] / 2.0], [3.5, 7.25]])
    np.testing.assert_allclose(
        fits[0].points_to_input(torch.tensor(points)).numpy(), resize.apply_coords(points, shape[:2]), rtol=1e-6
    )


def test_resize_square_matches_sam2_transforms():
    from sam2.utils.transforms import SAM2Transforms

    spec = preprocess_spec("sam2.1_hiera_l")
    for shape in ((300, 420), (1200, 900)):
        image = _smooth_image(*shape)
        expected = SAM2Transforms(resolution=1024, mask_threshold=0.0)(image)
        diff = _levels(prepare_batch([image], spec)[0][0], expected, spec)
        assert diff.max() <= 1.5 and diff.mean() < 0.5  # uint8 rounding of our resize vs float


@pytest.mark.parametrize("shape", [(300, 420), (301, 299), (20, 900), (5, 300), (900, 640)])
def test_resize_center_crop_matches_clip_and_dinov2_transforms(shape):
    import open_clip
    import torchvision.transforms as T
    from PIL import Image

    image = _smooth_image(*shape)
    dinov2_eval = T.Compose(  # DINOv2's classification eval transform
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    for tag, transform in (
        ("clip_vit_b32_openai", open_clip.image_transform(224, is_train=False)),
        ("dinov2_vitl14", dinov2_eval),
    ):
        spec = preprocess_spec(tag)
        expected = transform(Image.fromarray(image))
        diff = _levels(prepare_batch([image], spec)[0][0], expected, spec)
        assert diff.max() <= 2.01 and diff.mean() < 0.05, (tag, diff.max(), diff.mean())


def test_extreme_aspect_ratio_uses_a_crop_window(monkeypatch):
    spec = preprocess_spec("dinov2_vits14")
    image = _smooth_image(40, 2400)
    full = prepare_batch([image], spec)[0][0]
    monkeypatch.setattr(preprocess_module, "_MAX_RESIZED_PIXELS", 10_000)  # force the window path
    windowed = prepare_batch([image], spec)[0][0]
    assert _levels(windowed, full, spec).mean() < 4.0  # the same crop, up to half a pixel of shift
    line = np.zeros((1, 200_000, 3), dtype=np.uint8)  # resized whole it would be 256 x 51M pixels
    line[:, 100_000:] = 255
    pixels, fit = fit_image(line, spec)
    assert tuple(pixels.shape) == (3, 224, 224)
    row = pixels[0, 0].int()  # the black/white edge sits at the centre: a ramp symmetric about column 112
    assert abs(row[112].item() - 127.5) < 8
    assert ((row[12:112] + row[113:213].flip(0)) - 255).abs().max() <= 4


def test_gray_rgba_16bit_and_float_images_match_their_rgb_version():
    rgb_gray = np.repeat(_smooth_image(60, 80)[:, :, :1], 3, axis=2)
    gray = rgb_gray[:, :, 0]
    rgb = _smooth_image(60, 80, seed=1)
    rgba = np.concatenate([rgb, np.full((60, 80, 1), 7, np.uint8)], axis=2)
    sixteen = rgb.astype(np.uint16) * 257
    floating = rgb.astype(np.float32) / 255.0
    for tag in ("sam_vit_b", "sam2.1_hiera_t", "dinov2_vits14", "clip_vit_b16_openai"):
        spec = preprocess_spec(tag)
        reference, _ = prepare_batch([rgb_gray, rgb], spec)
        batch, _ = prepare_batch([gray, rgba, sixteen, floating, torch.from_numpy(rgb).permute(2, 0, 1)], spec)
        assert torch.equal(batch[0], reference[0])
        for i in (1, 2, 3, 4):
            assert torch.equal(batch[i], reference[1]), (tag, i)


@pytest.mark.parametrize("fit", FIT_MODES)
def test_tiny_and_huge_images(fit):
    spec = preprocess_spec("dinov2_vits14", fit=fit)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
        rng.integers(0, 256, (5, 300), dtype=np.uint8),
        rng.integers(0, 256, (300, 5, 4), dtype=np.uint8),
        rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8),
    ]
    batch, fits = prepare_batch(images, spec)
    assert tuple(batch.shape) == (4, 3, 224, 224) and torch.isfinite(batch).all()
    for fit_result, image in zip(fits, images):
        assert fit_result.original_size == image.shape[:2]
        x0, y0, x1, y1 = fit_result.valid_box
        assert 1 <= x1 - x0 <= 224 and 1 <= y1 - y0 <= 224


def test_rejections_are_clear():
    spec = preprocess_spec("sam_vit_b")
    with pytest.raises(ValueError, match=r"expected \[H, W\] or \[H, W, C\]"):
        fit_image(np.zeros((0, 10, 3), np.uint8), spec)
    with pytest.raises(ValueError, match=r"must be \[3, H, W\]"):
        fit_image(torch.zeros(20, 30, 3, dtype=torch.uint8), spec)  # tensors are channels-first
    with pytest.raises(ValueError, match="dtype int32"):
        fit_image(np.zeros((10, 10), np.int32), spec)
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        fit_image([[0, 1], [2, 3]], spec)
    with pytest.raises(ValueError, match="at least one image"):
        prepare_batch([], spec)
    with pytest.raises(ValueError, match=r"input_size=500 must be a positive multiple of patch_size=14 \(nearest: 504\)"):
        preprocess_spec("dinov2_vits14", input_size=500)
    with pytest.raises(ValueError, match="fit='stretch' is not one of"):
        preprocess_spec("dinov2_vits14", fit="stretch")
    with pytest.raises(KeyError, match="known tags"):
        preprocess_spec("dinov3_vits16")


@pytest.mark.parametrize("tag,fit", [("sam_vit_b", None), ("sam2.1_hiera_t", None), ("dinov2_vits14", None), ("clip_vit_b32_openai", None), ("dinov2_vits14", "resize_square")])
def test_image_fit_maps_points_boxes_and_masks_back(tag, fit):
    spec = preprocess_spec(tag, input_size=224 if tag.startswith(("sam", "dino")) else None, fit=fit)
    H, W = 180, 260
    mask = np.zeros((H, W), dtype=bool)
    mask[60:130, 110:200] = True
    # Fit the mask itself as an image: the fitted mask is what a model would predict on the input.
    pixels, fit_result = fit_image(mask.astype(np.uint8) * 255, spec)
    S = spec.input_size
    predicted = torch.zeros(1, S, S)
    predicted[0, : pixels.shape[1], : pixels.shape[2]] = pixels[0].float() / 255.0
    back = fit_result.mask_to_original(predicted > 0.5)[0].numpy()
    # compare where the input saw the image (centre crops cut the sides off)
    seen = fit_result.mask_to_original(torch.ones(1, S, S, dtype=torch.bool))[0].numpy()
    inter, union = (back & mask & seen).sum(), ((back | mask) & seen).sum()
    assert inter / union > 0.95, (tag, inter / union)
    # points and boxes round trip; the mask's box lands on the fitted mask's box
    points = torch.tensor([[0.0, 0.0], [W, H], [17.5, 99.0]], dtype=torch.float64)
    torch.testing.assert_close(fit_result.points_to_original(fit_result.points_to_input(points)), points)
    box = fit_result.boxes_to_input(torch.tensor([[110.0, 60.0, 200.0, 130.0]]))[0]
    ys, xs = np.nonzero(pixels[0].numpy() > 127)
    fitted_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    visible = torch.tensor([max(box[0], 0), max(box[1], 0), min(box[2], S), min(box[3], S)])
    assert (visible - fitted_box).abs().max() <= 1.5
    assert isinstance(fit_result, ImageFit)


@pytest.mark.parametrize("shape,size", [((48, 80), 1024), ((480, 640), 64), ((129, 77), 112)])
def test_pil_bicubic_is_pillows_resize(shape, size):
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)  # noise: the hardest case
    pixels, fit = fit_image(image, preprocess_spec("sam2.1_hiera_l", input_size=size, fit="resize_square",
                                                   interpolation="pil_bicubic"))
    want = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    assert pixels.dtype == torch.uint8 and np.array_equal(pixels.permute(1, 2, 0).numpy(), want)
    assert fit.scale == (size / shape[0], size / shape[1])


def test_bicubic_float_keeps_overshoot_and_is_torch_bicubic():
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[:, 10:] = 255  # a step edge: bicubic overshoots on both sides
    spec = preprocess_spec("dinov2_vits14", input_size=56, fit="resize_square", interpolation="bicubic_float")
    pixels, _ = fit_image(image, spec)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(56, 56), mode="bicubic", align_corners=False
    )[0]
    assert pixels.dtype == torch.float32 and torch.equal(pixels, want)
    assert pixels.min() < 0 and pixels.max() > 255  # not rounded, not clamped
    x, _ = prepare_batch([image], spec)  # normalised as any other input
    torch.testing.assert_close(x[0], (want - torch.tensor(spec.pixel_mean)[:, None, None]) / torch.tensor(spec.pixel_std)[:, None, None])
    with pytest.raises(ValueError, match="interpolation='nearest' is not one of"):
        preprocess_spec("dinov2_vits14", interpolation="nearest")
