"""Contract tests of the detection structures (Boxes, BoxMode, BitMasks, ImageList, Instances).

They run against the active backend (Detectron2 or lite); expected values are computed by hand
in each test, not taken from the implementation.
"""
import numpy as np
import pytest
import torch

from samantics_d2.d2 import BitMasks, Boxes, BoxMode, ImageList, Instances, pairwise_iou


def _random_xyxy(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------- BoxMode
def test_boxmode_values_are_detectron2s():
    assert [int(m) for m in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS, BoxMode.XYXY_REL, BoxMode.XYWH_REL)] == [0, 1, 2, 3]
    assert int(BoxMode.XYWHA_ABS) == 4


def test_boxmode_convert_hand_values_and_types():
    assert BoxMode.convert([10, 20, 30, 60], BoxMode.XYXY_ABS, BoxMode.XYWH_ABS) == [10, 20, 20, 40]
    out = BoxMode.convert((1.5, 2.0, 3.0, 4.0), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    assert isinstance(out, tuple) and out == (1.5, 2.0, 4.5, 6.0)
    arr = np.array([[0.0, 0.0, 4.0, 2.0], [1.0, 1.0, 2.0, 5.0]], dtype=np.float32)
    out = BoxMode.convert(arr, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0, 4, 2], [1, 1, 1, 4]])
    np.testing.assert_allclose(arr, [[0, 0, 4, 2], [1, 1, 2, 5]])  # input untouched


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_boxmode_round_trips(kind):
    xyxy = _random_xyxy(7)
    boxes = xyxy if kind == "tensor" else xyxy.numpy()
    xywh = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    assert type(xywh) is type(boxes)
    xywh_t = torch.as_tensor(xywh)
    torch.testing.assert_close(xywh_t[:, 2:], xyxy[:, 2:] - xyxy[:, :2])
    back = BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    torch.testing.assert_close(torch.as_tensor(back), xyxy)
    # Detectron2's rotated conversions: XYWH_ABS -> XYWHA_ABS (angle 0) and XYWHA_ABS -> XYXY_ABS
    rotated = BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYWHA_ABS)
    rotated_t = torch.as_tensor(rotated)
    assert type(rotated) is type(boxes) and rotated_t.dtype == xyxy.dtype
    torch.testing.assert_close(rotated_t[:, :2], (xyxy[:, :2] + xyxy[:, 2:]) / 2)
    torch.testing.assert_close(rotated_t[:, 4], torch.zeros(7))
    torch.testing.assert_close(torch.as_tensor(BoxMode.convert(rotated, BoxMode.XYWHA_ABS, BoxMode.XYXY_ABS)), xyxy)
    with pytest.raises(NotImplementedError):  # not a conversion Detectron2 has
        BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWHA_ABS)


def test_boxmode_rotated_by_90_degrees_swaps_extent():
    # centre (10, 20), w 4, h 2, rotated 90 degrees: the enclosing box is 2 wide, 4 high.
    out = BoxMode.convert(torch.tensor([[10.0, 20.0, 4.0, 2.0, 90.0]]), BoxMode.XYWHA_ABS, BoxMode.XYXY_ABS)
    torch.testing.assert_close(out, torch.tensor([[9.0, 18.0, 11.0, 22.0]]), atol=1e-5, rtol=0)


def test_boxmode_relative_modes_are_refused():
    with pytest.raises(Exception):
        BoxMode.convert([0.1, 0.1, 0.5, 0.5], BoxMode.XYXY_REL, BoxMode.XYXY_ABS)


# ---------------------------------------------------------------- Boxes
def test_boxes_basic_geometry():
    b = Boxes([[0, 0, 4, 2], [1, 1, 3, 5], [5, 5, 5, 9]])
    assert b.tensor.dtype == torch.float32 and len(b) == 3
    torch.testing.assert_close(b.area(), torch.tensor([8.0, 8.0, 0.0]))
    assert b.nonempty().tolist() == [True, True, False]
    torch.testing.assert_close(b.get_centers(), torch.tensor([[2.0, 1.0], [2.0, 3.0], [5.0, 7.0]]))
    assert b.inside_box((6, 6)).tolist() == [True, True, False]  # the last one reaches y=9 > 6
    c = b.clone()
    c.clip((4, 4))
    torch.testing.assert_close(c.tensor, torch.tensor([[0.0, 0, 4, 2], [1, 1, 3, 4], [4, 4, 4, 4]]))
    torch.testing.assert_close(b.tensor[2], torch.tensor([5.0, 5, 5, 9]))  # clone is independent
    c.scale(2.0, 0.5)
    torch.testing.assert_close(c.tensor[1], torch.tensor([2.0, 0.5, 6.0, 2.0]))
    assert [row.tolist() for row in b] == b.tensor.tolist()


def test_boxes_empty_input_has_shape_0_by_4():
    for empty in ([], torch.zeros(0), np.zeros((0, 4))):
        b = Boxes(empty)
        assert tuple(b.tensor.shape) == (0, 4) and len(b) == 0
        assert b.area().shape == (0,) and b.nonempty().shape == (0,)


def test_boxes_indexing_always_gives_boxes():
    t = _random_xyxy(5)
    b = Boxes(t)
    one = b[2]
    assert isinstance(one, Boxes) and tuple(one.tensor.shape) == (1, 4)
    torch.testing.assert_close(one.tensor[0], t[2])
    torch.testing.assert_close(b[1:4].tensor, t[1:4])
    mask = torch.tensor([True, False, True, False, True])
    torch.testing.assert_close(b[mask].tensor, t[[0, 2, 4]])
    torch.testing.assert_close(b[torch.tensor([4, 0])].tensor, t[[4, 0]])
    assert len(b[torch.zeros(5, dtype=torch.bool)]) == 0


def test_boxes_cat_and_to():
    a, c = Boxes(_random_xyxy(2, seed=1)), Boxes(_random_xyxy(3, seed=2))
    cat = Boxes.cat([a, c])
    assert len(cat) == 5
    torch.testing.assert_close(cat.tensor, torch.cat([a.tensor, c.tensor]))
    moved = cat.to(torch.device("cpu"))
    assert moved.device == torch.device("cpu") and moved.tensor.dtype == torch.float32
    torch.testing.assert_close(moved.tensor, cat.tensor)


def test_pairwise_iou_against_hand_computation():
    boxes1 = Boxes([[0, 0, 2, 2], [10, 10, 12, 14]])
    boxes2 = Boxes([[1, 1, 3, 3], [0, 0, 2, 2], [11, 10, 13, 12], [5, 5, 5, 5]])
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7.
    # [10,10,12,14] (area 8) vs [11,10,13,12] (area 4): intersection 1 x 2 = 2, union 10.
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.0], [0.0, 0.0, 2 / 10, 0.0]])
    iou = pairwise_iou(boxes1, boxes2)
    assert iou.shape == (2, 4)
    torch.testing.assert_close(iou, expected)
    assert torch.isfinite(pairwise_iou(Boxes([[5, 5, 5, 5]]), Boxes([[5, 5, 5, 5]]))).all()
    assert pairwise_iou(Boxes([]), boxes2).shape == (0, 4)


def test_pairwise_ioa_against_hand_computation():
    from samantics_d2.lite.structures import pairwise_ioa  # not a seam name: lite's own

    ioa = pairwise_ioa(Boxes([[0, 0, 2, 2]]), Boxes([[1, 1, 3, 3], [0, 0, 1, 1], [5, 5, 6, 6]]))
    torch.testing.assert_close(ioa, torch.tensor([[1 / 4, 1.0, 0.0]]))


# ---------------------------------------------------------------- BitMasks
def test_bitmasks_boxes_nonempty_and_indexing():
    m = torch.zeros(3, 6, 8, dtype=torch.bool)
    m[0, 1:3, 3:6] = True  # rows 1-2, cols 3-5
    m[2, 5, 7] = True  # one pixel in the corner
    masks = BitMasks(m)
    assert masks.image_size == (6, 8) and len(masks) == 3
    torch.testing.assert_close(
        masks.get_bounding_boxes().tensor, torch.tensor([[3.0, 1, 6, 3], [0, 0, 0, 0], [7, 5, 8, 6]])
    )
    assert masks.nonempty().tolist() == [True, False, True]
    assert isinstance(masks[0], BitMasks) and masks[0].tensor.shape == (1, 6, 8)
    assert torch.equal(masks[torch.tensor([True, False, True])].tensor, m[[0, 2]])
    cat = BitMasks.cat([masks, masks[1:]])
    assert len(cat) == 5 and torch.equal(cat.tensor[3:], m[1:])
    assert BitMasks(m.to(torch.uint8)).tensor.dtype == torch.bool
    assert masks.to("cpu").device == torch.device("cpu")


def test_polygons_to_bitmask():
    from samantics_d2.lite.structures import polygons_to_bitmask  # not a seam name: lite's own

    # An axis-aligned square from (1, 1) to (4, 4) covers pixels 1..3 in each direction.
    mask = polygons_to_bitmask([np.array([1, 1, 4, 1, 4, 4, 1, 4], dtype=np.float64)], 6, 6)
    assert mask.dtype == bool and mask.shape == (6, 6)
    expected = np.zeros((6, 6), dtype=bool)
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(mask, expected)
    assert not polygons_to_bitmask([], 5, 7).any()


# ---------------------------------------------------------------- ImageList
def test_imagelist_pads_bottom_right_and_unpads():
    a = torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(3, 5, 7)
    b = torch.ones(3, 6, 4)
    il = ImageList.from_tensors([a, b], pad_value=-1.0)
    assert il.tensor.shape == (2, 3, 6, 7) and len(il) == 2
    assert [tuple(s) for s in il.image_sizes] == [(5, 7), (6, 4)]
    assert torch.equal(il[0], a) and torch.equal(il[1], b)
    assert (il.tensor[0, :, 5:, :] == -1).all() and (il.tensor[1, :, :, 4:] == -1).all()


def test_imagelist_size_divisibility_and_square_size():
    a, b = torch.zeros(3, 5, 7), torch.zeros(3, 6, 4)
    assert ImageList.from_tensors([a, b], size_divisibility=4).tensor.shape == (2, 3, 8, 8)
    assert ImageList.from_tensors([a], size_divisibility=32).tensor.shape == (1, 3, 32, 32)
    square = ImageList.from_tensors([a, b], padding_constraints={"square_size": 10})
    assert square.tensor.shape == (2, 3, 10, 10)
    assert torch.equal(square[1], b)
    # padding_constraints' size_divisibility wins over the argument
    il = ImageList.from_tensors([a, b], size_divisibility=4, padding_constraints={"size_divisibility": 14})
    assert il.tensor.shape == (2, 3, 14, 14)
    assert il.to("cpu").tensor.dtype == torch.float32


# ---------------------------------------------------------------- Instances
def _instances(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((20, 30))
    inst.pred_boxes = Boxes(_random_xyxy(n, seed))
    inst.scores = torch.rand(n, generator=g)
    inst.pred_classes = torch.arange(n, dtype=torch.int64)
    inst.pred_masks = BitMasks(torch.rand(n, 20, 30, generator=g) > 0.5)
    inst.set("names", [f"obj{i}" for i in range(n)])
    return inst


def test_instances_fields():
    inst = _instances()
    assert len(inst) == 4 and inst.image_size == (20, 30)
    assert inst.has("scores") and not inst.has("gt_boxes")
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks", "names"}
    assert inst.get("scores") is inst.scores
    with pytest.raises(AttributeError):
        inst.gt_boxes  # noqa: B018
    with pytest.raises(Exception):  # every field must have the same length
        inst.bad = torch.zeros(3)
    inst.remove("names")
    assert not inst.has("names")
    assert "num_instances=4" in repr(inst)


def test_instances_indexing():
    inst = _instances()
    one = inst[1]
    assert isinstance(one, Instances) and len(one) == 1
    torch.testing.assert_close(one.scores, inst.scores[1:2])
    assert one.names == ["obj1"]
    assert inst[-1].pred_classes.tolist() == [3]
    with pytest.raises(IndexError):
        inst[4]
    assert inst[1:3].names == ["obj1", "obj2"]
    inst.remove("names")  # a list field takes ints and slices only (as in Detectron2)
    keep = inst.scores > 0.5
    sub = inst[keep]
    assert len(sub) == int(keep.sum())
    torch.testing.assert_close(sub.pred_boxes.tensor, inst.pred_boxes.tensor[keep])
    assert torch.equal(sub.pred_masks.tensor, inst.pred_masks.tensor[keep])
    order = torch.tensor([3, 0])
    assert inst[order].pred_classes.tolist() == [3, 0]


def test_instances_cat_and_to():
    a, b = _instances(3, seed=1), _instances(2, seed=2)
    cat = Instances.cat([a, b])
    assert len(cat) == 5 and cat.image_size == (20, 30)
    torch.testing.assert_close(cat.scores, torch.cat([a.scores, b.scores]))
    torch.testing.assert_close(cat.pred_boxes.tensor, torch.cat([a.pred_boxes.tensor, b.pred_boxes.tensor]))
    assert torch.equal(cat.pred_masks.tensor, torch.cat([a.pred_masks.tensor, b.pred_masks.tensor]))
    assert cat.names == a.names + b.names
    moved = cat.to("cpu")
    assert moved.scores.dtype == torch.float32 and moved.pred_classes.dtype == torch.int64
    assert moved.pred_masks.tensor.dtype == torch.bool and moved.pred_boxes.tensor.dtype == torch.float32
    torch.testing.assert_close(moved.scores, cat.scores)


def test_empty_instances():
    assert Instances((5, 5)).image_size == (5, 5)
    with pytest.raises(NotImplementedError):
        len(Instances((5, 5)))  # no fields: no length, as in Detectron2
    empty = Instances((8, 8), pred_boxes=Boxes([]), scores=torch.zeros(0), pred_classes=torch.zeros(0).long())
    assert len(empty) == 0
    assert len(empty[empty.scores > 0.5]) == 0
    full = Instances((8, 8), pred_boxes=Boxes([[0, 0, 1, 1]]), scores=torch.ones(1), pred_classes=torch.ones(1).long())
    cat = Instances.cat([empty, full])
    assert len(cat) == 1 and cat.pred_classes.tolist() == [1]
    assert len(empty.to("cpu")) == 0
