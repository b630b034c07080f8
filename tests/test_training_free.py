"""TrainingFreeSegmenter outputs at the requested size (Detectron2's DefaultPredictor-style resize)."""
import pytest
import torch

from samantics_d2.d2 import MetadataCatalog, load_coco_json
from samantics_d2.data.mapper import DetectionMapper
from samantics_d2.data.shapes import generate_shapes
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.training_free import TrainingFreeSegmenter, build_sam_proposer
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
