"""TrainingFreeSegmenter outputs at the requested size (Detectron2's DefaultPredictor-style resize)."""
import pytest
import torch

from samantics_d2.d2 import MetadataCatalog, load_coco_json
from samantics_d2.data.mapper import DetectionMapper
from samantics_d2.data.shapes import generate_shapes
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.training_free import TrainingFreeSegmenter, build_sam_proposer
from samantics_d2.modeling.proposals import MaskProposals
from samantics_d2.modeling.semantic import PrototypeClassifier
from samantics_d2.references import build_reference_bank


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Two 64 px shapes images as dataset dicts, and their class names."""
    root = tmp_path_factory.mktemp("shapes")
    json_file = generate_shapes(str(root), num_images=2, image_size=64, seed=0, instances_per_image=(2, 3))
    dicts = load_coco_json(json_file, str(root / "images"), "test_training_free_shapes")
    return dicts, list(MetadataCatalog.get("test_training_free_shapes").thing_classes)


def _segmenter(references, classes, bank_path):
    torch.manual_seed(0)
    segmenter = TrainingFreeSegmenter(
        proposer=build_sam_proposer(backbone=build_encoder("sam_vit_b", size="tiny", input_size=128),
                                    points_per_side=4, pred_iou_thresh=None),
        semantic_encoder=build_encoder("dinov2_vits14", size="tiny"),
        classifier=PrototypeClassifier(),
        reference_bank=build_reference_bank(references=references, reference_classes=classes, cache_path=str(bank_path)),
    ).eval()
    segmenter.prepare_references()  # after building (and loading), before the first image
    return segmenter


@pytest.mark.parametrize("with_references", [True, False])
def test_outputs_at_the_requested_size(shapes, tmp_path, with_references):
    dicts, classes = shapes
    segmenter = _segmenter(dicts if with_references else [], classes, tmp_path / "bank.safetensors")
    image = DetectionMapper(is_train=False, augmentations=[])(dicts[0])["image"]  # [3, 64, 64]
    height, width = 96, 80  # the predictor resized the image: outputs go back to the original size
    with torch.no_grad():
        (output,) = segmenter([{"image": image, "height": height, "width": width}])
    instances = output["instances"]
    assert instances.image_size == (height, width)
    assert instances.pred_masks.shape == (len(instances), height, width) and instances.pred_masks.dtype == torch.bool
    assert len(instances.pred_boxes) == len(instances.scores) == len(instances.pred_classes) == len(instances)
    if with_references:
        assert len(instances) > 0
        boxes = instances.pred_boxes.tensor
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    else:  # no reference: no prototype, no detection (this raised RuntimeError when the size differed)
        assert len(instances) == 0


class _ThinAndThickProposals(torch.nn.Module):
    """The real proposer's encoder fit, with made-up masks: squares (2 x 2 cells of the mask grid)
    and lines one cell wide, all apart, so that only the lines can vanish at a small output size."""

    def __init__(self, proposer):
        super().__init__()
        self.proposer = proposer

    def forward(self, image, *, boxes=None):
        real = self.proposer(image, boxes=boxes)
        side = real.mask_logits.shape[-1]
        logits = torch.full((8, side, side), -10.0)
        for i in range(4):
            row, col = 1 + 4 * i, 2 + 3 * i  # the 64 px image fills the 32 x 32 grid: a cell is 2 image px
            logits[i, row : row + 2, col : col + 2] = 10.0  # a square, 4 x 4 image px
            logits[4 + i, row + 2, 0 : side // 2] = 10.0  # a line, 2 image px high
        count = len(logits)
        return MaskProposals(mask_logits=logits, iou_pred=torch.linspace(0.9, 0.5, count), stability=torch.ones(count),
                             points=torch.zeros(count, 2), fit=real.fit)


def test_drop_empty_masks_removes_only_the_detections_that_vanish_at_the_output_size(shapes, tmp_path):
    """A thin mask can vanish when the masks are resized down to the output size; with the option
    those detections go, and every other one is kept as it was (same order, scores, classes, masks)."""
    dicts, classes = shapes
    image = DetectionMapper(is_train=False, augmentations=[])(dicts[0])["image"]  # [3, 64, 64]
    size = 6  # resized from 64 px by nearest: one row in about 10 is sampled
    segmenter = _segmenter(dicts, classes, tmp_path / "bank.safetensors")
    segmenter.proposer = _ThinAndThickProposals(segmenter.proposer)
    with torch.no_grad():
        kept_all = segmenter([{"image": image, "height": size, "width": size}])[0]["instances"]
        segmenter.drop_empty_masks = True
        dropped = segmenter([{"image": image, "height": size, "width": size}])[0]["instances"]
    non_empty = kept_all.pred_masks.flatten(1).any(dim=1)
    assert (~non_empty).any() and non_empty.any(), f"the case at hand needs masks that vanish and masks that stay: {non_empty}"
    assert dropped.pred_masks.flatten(1).any(dim=1).all()
    assert torch.equal(dropped.pred_masks, kept_all.pred_masks[non_empty])
    assert torch.equal(dropped.scores, kept_all.scores[non_empty])
    assert torch.equal(dropped.pred_classes, kept_all.pred_classes[non_empty])
    assert torch.equal(dropped.pred_boxes.tensor, kept_all.pred_boxes.tensor[non_empty])


def test_drop_empty_masks_must_be_a_bool(shapes, tmp_path):
    dicts, classes = shapes
    segmenter = _segmenter(dicts, classes, tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match="drop_empty_masks='yes'"):
        TrainingFreeSegmenter(proposer=segmenter.proposer, semantic_encoder=segmenter.semantic_encoder,
                              classifier=PrototypeClassifier(), reference_bank=segmenter.reference_bank,
                              drop_empty_masks="yes")
