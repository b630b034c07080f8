"""The yacs plug-in path: ``get_cfg`` + ``add_samantics_config`` + a YAML file -> ``build_model`` and
``DefaultPredictor``, as a Detectron2 project builds models (the same tests run on both backends)."""
import inspect
import pathlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from samantics_d2 import add_samantics_config
from samantics_d2.d2 import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    DatasetCatalog,
    DefaultPredictor,
    LazyConfig,
    MetadataCatalog,
    ShapeSpec,
    build_backbone,
    build_model,
    configurable,
    get_cfg,
    instantiate,
)
from samantics_d2.data.io import read_image
from samantics_d2.data.panoptic import ClickMapper
from samantics_d2.data.prompted import PromptedRecognitionMapper
from samantics_d2.modeling.backbone import BACKBONE_CLASSES, EncoderBackbone, build_encoder
from samantics_d2.modeling.meta_arch import TinySegmenter
from samantics_d2.references import prepare_references

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "configs" / "yacs").glob("*.yaml") if not p.name.startswith("Base-"))


def _our_meta_architectures():
    """Registered meta-architectures of samantics_d2 (Detectron2 registers its own in the same registry)."""
    return {name: cls for name, cls in META_ARCH_REGISTRY if cls.__module__.startswith("samantics_d2.")}


def _cfg(path=None, *overrides):
    cfg = get_cfg()
    add_samantics_config(cfg)
    if path is not None:
        cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(overrides))
    return cfg


@pytest.fixture(scope="module")
def shapes_image():
    """The first shapes_val image: (BGR uint8 [H, W, 3] as cv2 reads it, RGB uint8 [3, H, W] tensor)."""
    rgb = read_image(DatasetCatalog.get("shapes_val")[0]["file_name"], format="RGB")
    return np.ascontiguousarray(rgb[:, :, ::-1]), torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def test_every_meta_architecture_has_an_example():
    assert EXAMPLES, "no configs/yacs/*.yaml"
    architectures = {_cfg(p).MODEL.META_ARCHITECTURE for p in EXAMPLES}
    assert architectures == set(_our_meta_architectures())


# Models whose input holds more than an image: what their test loader's mapper adds (ClickSegmenter:
# the GT segments to click; OpenVocabPromptedSegmenter: one box prompt per GT instance), and the key
# whose absence DefaultPredictor's image-only call must name. Such a model predicts from the mapped
# first image of DATASETS.TEST[0] instead (the data-loader path of a Detectron2 evaluation).
INPUT_MAPPERS = {
    "ClickSegmenter": (lambda: ClickMapper(short_edge=None), "instances"),
    "OpenVocabPromptedSegmenter": (lambda: PromptedRecognitionMapper(prompt="box", long_side=128), "prompts"),
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_builds_and_predicts(path, shapes_image, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path / "cache"))  # text prototypes, memory banks
    cfg = _cfg(path)
    if cfg.MODEL.META_ARCHITECTURE == "TrainingFreeSegmenter":
        cfg.MODEL.SAMANTICS.TRAINING_FREE.MEMORY_BANK_PATH = str(tmp_path / "bank.safetensors")
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)  # build_model(cfg) + MODEL.WEIGHTS ("": none) + test-time resize
    model = predictor.model
    prepare_references(model)  # reference features with the loaded weights (a no-op for models without)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE and not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    if cfg.MODEL.META_ARCHITECTURE in INPUT_MAPPERS:
        _check_mapped_prediction(cfg, predictor, shapes_image)
        return
    bgr, rgb = shapes_image
    H, W = bgr.shape[:2]
    with torch.no_grad():  # the data-loader path: uint8 RGB at the original size
        (loader_output,) = model([{"image": rgb, "height": H, "width": W}])
    predicted = predictor(bgr)  # BGR in, resized to MIN_SIZE_TEST inside, outputs at H x W
    assert predicted.keys() == loader_output.keys()
    if "logits" in predicted:  # LinearProbe: the classes of DATASETS.TRAIN[0]
        classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).classes
        assert predicted["logits"].shape == (len(classes),) and torch.isfinite(predicted["logits"]).all()
        assert predicted["pred_class"] == predicted["logits"].argmax()
        return
    classes = MetadataCatalog.get((cfg.DATASETS.TRAIN or cfg.DATASETS.TEST)[0]).thing_classes
    for output in (loader_output, predicted):
        instances = output["instances"]
        n = len(instances)
        assert instances.image_size == (H, W)
        assert instances.pred_masks.shape == (n, H, W) and instances.pred_masks.dtype == torch.bool
        assert len(instances.pred_boxes) == instances.scores.shape[0] == instances.pred_classes.shape[0] == n
        assert torch.isfinite(instances.scores).all()
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < len(classes))).all()
        if cfg.MODEL.META_ARCHITECTURE in ("TinySegmenter", "TrainingFreeSegmenter", "RefSAM"):
            assert n > 0, f"{path.name}: no detection from the random model on a shapes image"


def _check_mapped_prediction(cfg, predictor, shapes_image):
    """A model of INPUT_MAPPERS: DefaultPredictor's image-only call names the missing input; the
    mapped first image of DATASETS.TEST[0] gives outputs of the documented format."""
    make_mapper, needed = INPUT_MAPPERS[cfg.MODEL.META_ARCHITECTURE]
    with pytest.raises(ValueError, match=needed):
        predictor(shapes_image[0])
    x = make_mapper()(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])
    H, W = x["height"], x["width"]
    with torch.no_grad():
        (output,) = predictor.model([x])
    classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes
    if needed == "instances":  # clicks (samantics_d2.evaluation.click's format)
        clicks, S = output["clicks"], len(x["instances"])
        assert S > 0 and clicks["points"].shape == (S, cfg.MODEL.SAMANTICS.CLICK.MAX_CLICKS, 2)
        assert len(clicks["masks"]) == len(clicks["pred_classes"]) == cfg.MODEL.SAMANTICS.CLICK.MAX_CLICKS
        first = clicks["masks"][0]
        assert first.shape[:2] == clicks["pred_ious"][0].shape == clicks["pred_classes"][0].shape
        assert first.shape[0] == S and first.shape[2:] == (H, W) and first.dtype == torch.bool
        assert ((clicks["pred_classes"][0] >= -1) & (clicks["pred_classes"][0] < len(classes))).all()
        return
    instances = output["instances"]  # one row per prompt, in input order
    n = len(x["prompts"]["boxes"])
    assert n > 0 and len(instances) == n and instances.image_size == (H, W)
    assert instances.pred_masks.shape == (n, H, W) and instances.pred_masks.dtype == torch.bool
    assert torch.isfinite(instances.scores).all() and ((instances.scores >= 0) & (instances.scores <= 1)).all()
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < len(classes))).all()


# Each yacs example and the LazyConfig file it mirrors (same architecture, built the other way).
LAZY_TWINS = {
    "click_shapes_parts": "click/shapes_parts_tiny.py",
    "linear_probe_shapes": "linear_probe/tiny_shapes.py",
    "open_vocab_shapes": "open_vocab/shapes_tiny.py",
    "ref_sam_shapes": "ref_sam/tiny_shapes.py",
    "sam_trainer_shapes": "quick/tiny_sam_shapes.py",
    "tiny_segmenter_shapes": "quick/tiny_segmenter_shapes.py",
    "training_free_shapes": "training_free/shapes_tiny_random.py",
}


# Where a twin's architecture differs in a part the model never runs: the click model's label model's
# SAM proposer (ClickSegmenter reads only its semantic encoder and prototypes) is a separate 64 px SAM in
# the LazyConfig file; the yacs path gives the label model the click model's own SAM (256 px input).
LAZY_TWIN_OVERRIDES = {
    "click_shapes_parts": ["model.label_model.proposer.backbone.input_size=256"],
}


@pytest.mark.parametrize("name", sorted(LAZY_TWINS))
def test_example_builds_the_architecture_of_its_lazy_config(name, tmp_path, monkeypatch):
    """from_config wires the same modules as the LazyConfig files (same parameter and buffer shapes)."""
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path / "cache"))  # text prototypes built with the model
    assert {p.stem for p in EXAMPLES} == set(LAZY_TWINS)
    lazy = LazyConfig.load(str(ROOT / "configs" / LAZY_TWINS[name]))
    lazy = LazyConfig.apply_overrides(lazy, LAZY_TWIN_OVERRIDES.get(name, []))
    from_lazy = instantiate(lazy.model)
    from_yacs = build_model(_cfg(ROOT / "configs" / "yacs" / f"{name}.yaml"))
    assert type(from_yacs) is type(from_lazy)
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (from_yacs, from_lazy)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("name, key, lazy_key", [
    ("sam_trainer_shapes", "SAM_TRAINER.LOSS_WEIGHT.LOSS_IOU", "model.loss_weight.loss_iou"),
    ("ref_sam_shapes", "REF_SAM.LOSS.LOSS_WEIGHT.LOSS_BBOX", "model.criterion.loss_weight.loss_bbox"),
])
def test_loss_weights_are_set_the_same_way_on_both_paths(name, key, lazy_key, tmp_path, monkeypatch):
    """A loss weight set in the yacs node (a sub-node of the loss names) or by a LazyConfig override
    reaches the model; the other weights keep the defaults, which are the same on both paths."""
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path / "cache"))
    lazy = LazyConfig.apply_overrides(LazyConfig.load(str(ROOT / "configs" / LAZY_TWINS[name])), [f"{lazy_key}=7.5"])
    from_lazy = instantiate(lazy.model)
    from_yacs = build_model(_cfg(ROOT / "configs" / "yacs" / f"{name}.yaml", f"MODEL.SAMANTICS.{key}", 7.5))
    weights = [getattr(m, "criterion", m).loss_weight for m in (from_yacs, from_lazy)]
    loss = key.rsplit(".", 1)[1].lower()
    assert weights[0] == weights[1] and weights[0][loss] == 7.5
    defaults = type(getattr(from_yacs, "criterion", from_yacs)).DEFAULT_LOSS_WEIGHT
    assert {k: v for k, v in weights[0].items() if k != loss} == {k: v for k, v in defaults.items() if k != loss}
    assert defaults[loss] != 7.5


def test_training_free_options_are_set_the_same_way_on_both_paths(tmp_path, monkeypatch):
    """TrainingFreeSegmenter's own options (here drop_empty_masks) are keys of the TRAINING_FREE node."""
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path / "cache"))
    path = ROOT / "configs" / "yacs" / "training_free_shapes.yaml"
    lazy = LazyConfig.apply_overrides(LazyConfig.load(str(ROOT / "configs" / LAZY_TWINS["training_free_shapes"])),
                                      ["model.drop_empty_masks=True"])
    models = [instantiate(lazy.model), build_model(_cfg(path, "MODEL.SAMANTICS.TRAINING_FREE.DROP_EMPTY_MASKS", True))]
    assert [m.drop_empty_masks for m in models] == [True, True]
    assert build_model(_cfg(path)).drop_empty_masks is False  # the default keeps them, as No Time to Train


@pytest.mark.parametrize("family, tag", [("sam", "sam_vit_b"), ("hq_sam", "hq_sam_vit_b"), ("sam2", "sam2.1_hiera_t"),
                                         ("dinov2", "dinov2_vits14"), ("clip", "clip_vit_b32_openai")])
def test_build_backbone_gives_the_encoder_of_the_tag(family, tag):
    cls = BACKBONE_CLASSES[family]
    assert BACKBONE_REGISTRY.get(cls.__name__) is cls
    cfg = _cfg(None, "INPUT.FORMAT", "RGB", "MODEL.BACKBONE.NAME", cls.__name__, "MODEL.SAMANTICS.BACKBONE.TAG", tag,
               "MODEL.SAMANTICS.BACKBONE.SIZE", "tiny")
    backbone = build_backbone(cfg)  # called as cls(cfg, ShapeSpec(channels=3))
    reference = build_encoder(tag, size="tiny")
    assert type(backbone) is cls and backbone.output_shape() == reference.output_shape()
    assert backbone.preprocess == reference.preprocess
    assert {k: v.shape for k, v in backbone.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_every_registered_backbone_is_covered():
    ours = {name for name, obj in BACKBONE_REGISTRY if isinstance(obj, type) and issubclass(obj, EncoderBackbone)}
    assert ours == {cls.__name__ for cls in BACKBONE_CLASSES.values()}


def test_build_backbone_input_size_and_errors():
    cfg = _cfg(None, "INPUT.FORMAT", "RGB", "MODEL.BACKBONE.NAME", "SAMBackbone", "MODEL.SAMANTICS.BACKBONE.SIZE", "tiny",
               "MODEL.SAMANTICS.BACKBONE.INPUT_SIZE", 128)
    assert build_backbone(cfg).img_size == 128
    cfg.MODEL.SAMANTICS.BACKBONE.TAG = "dinov2_vits14"  # a DINOv2 tag for the SAM class
    with pytest.raises(ValueError, match="'dinov2' encoder, not a 'sam' one"):
        build_backbone(cfg)
    cfg.MODEL.SAMANTICS.BACKBONE.TAG = "sam_vit_b"
    cfg.MODEL.SAMANTICS.BACKBONE.PRETRAINED = True
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        build_backbone(cfg)
    cfg.MODEL.SAMANTICS.BACKBONE.PRETRAINED = False
    with pytest.raises(ValueError, match="3-channel"):
        build_backbone(cfg, ShapeSpec(channels=1))


def test_keyword_construction_still_works_and_cfg_arguments_override():
    for name, cls in _our_meta_architectures().items():
        assert inspect.ismethod(cls.from_config), name  # @configurable's contract
        assert hasattr(cls.__init__, "__wrapped__"), f"{name}.__init__ lacks @configurable"
    plain = TinySegmenter(num_classes=3, width=8)  # the LazyConfig path, unchanged
    assert plain.net[-1].out_channels == 4
    cfg = _cfg(ROOT / "configs" / "yacs" / "tiny_segmenter_shapes.yaml")
    model = TinySegmenter(cfg, width=8)  # from_config's arguments, width overridden
    assert model.net[0].out_channels == 8
    assert model.num_classes == len(MetadataCatalog.get("shapes_train").thing_classes)
    assert model.pixel_mean.flatten().tolist() == pytest.approx(list(cfg.MODEL.PIXEL_MEAN))


def test_bgr_input_format_and_missing_keys_are_rejected():
    cfg = _cfg(ROOT / "configs" / "yacs" / "tiny_segmenter_shapes.yaml", "INPUT.FORMAT", "BGR")
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        build_model(cfg)
    cfg = get_cfg()  # add_samantics_config forgotten
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "TinySegmenter", "MODEL.BACKBONE.NAME", "SAMBackbone"])
    for build in (build_model, build_backbone):
        with pytest.raises(KeyError, match="add_samantics_config"):
            build(cfg)


def test_unknown_keys_and_references_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  SAMANTICS:\n    TRAINING_FREE:\n      REFERNCES: shapes_train_ref5_seed0\n")
    with pytest.raises(KeyError, match="REFERNCES"):
        _cfg(bad)
    cfg = _cfg(ROOT / "configs" / "yacs" / "training_free_shapes.yaml",
               "MODEL.SAMANTICS.TRAINING_FREE.REFERENCES", "no_such_reference_set")
    with pytest.raises(KeyError, match="no_such_reference_set"):
        build_model(cfg)


def test_get_cfg_has_detectron2_defaults():
    cfg = get_cfg()
    assert cfg.VERSION == 2 and cfg.MODEL.DEVICE == "cuda" and cfg.MODEL.WEIGHTS == ""
    assert cfg.MODEL.PIXEL_MEAN == [103.530, 116.280, 123.675] and cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]
    assert (cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == ("BGR", 800, 1333)
    assert cfg.DATASETS.TRAIN == () and cfg.DATASETS.TEST == ()


class _RecordingModel(nn.Module):
    """Records what DefaultPredictor feeds the model."""

    @configurable
    def __init__(self, *, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.inputs = []

    @classmethod
    def from_config(cls, cfg):
        return {"scale": 1.0}

    def forward(self, batched_inputs):
        self.inputs.append(batched_inputs)
        return [{"scale": self.scale.detach().clone()}, {"never": "returned"}]


if "_YacsTestRecordingModel" not in {name for name, _ in META_ARCH_REGISTRY}:
    META_ARCH_REGISTRY.register(type("_YacsTestRecordingModel", (_RecordingModel,), {}))


@pytest.mark.parametrize("input_format, dtype", [("RGB", np.uint8), ("BGR", np.uint8), ("RGB", np.float32)])
def test_default_predictor_contract(tmp_path, input_format, dtype):
    """Detectron2's DefaultPredictor: loads MODEL.WEIGHTS, converts BGR input to INPUT.FORMAT, resizes
    the shortest edge (the long side capped; bilinear: PIL for uint8, torch otherwise), passes float32
    [C, h, w] with the original height and width, and returns the first prediction."""
    weights = tmp_path / "model.pth"
    torch.save({"model": {"scale": torch.tensor(2.5)}}, weights)
    cfg = _cfg(None, "MODEL.META_ARCHITECTURE", "_YacsTestRecordingModel", "MODEL.DEVICE", "cpu",
               "MODEL.WEIGHTS", str(weights), "INPUT.FORMAT", input_format, "INPUT.MIN_SIZE_TEST", 60,
               "INPUT.MAX_SIZE_TEST", 100, "DATASETS.TEST", ("shapes_val",))
    predictor = DefaultPredictor(cfg)
    assert predictor.metadata.name == "shapes_val"
    bgr = np.random.default_rng(0).integers(0, 256, size=(40, 90, 3), dtype=np.uint8).astype(dtype)
    out = predictor(bgr)
    assert out == {"scale": torch.tensor(2.5)}
    ((inputs,),) = predictor.model.inputs
    assert (inputs["height"], inputs["width"]) == (40, 90)
    image = inputs["image"]
    # 40 -> 60 would make the long side 135 > 100: the long side goes to 100 (44.4 -> 44 rows)
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 44, 100)
    source = np.ascontiguousarray(bgr[:, :, ::-1] if input_format == "RGB" else bgr)
    if dtype == np.uint8:
        expected = torch.from_numpy(np.asarray(Image.fromarray(source).resize((100, 44), Image.BILINEAR)).astype(np.float32))
        expected = expected.permute(2, 0, 1)
    else:
        expected = torch.nn.functional.interpolate(torch.from_numpy(source).permute(2, 0, 1)[None], (44, 100),
                                                   mode="bilinear", align_corners=False)[0]
    assert torch.equal(image, expected)
