"""Detection structures with the names and behaviour of ``detectron2.structures``.

``BoxMode``, ``Boxes``, ``pairwise_iou``, ``pairwise_ioa``, ``BitMasks``, ``polygons_to_bitmask``,
``ImageList`` and ``Instances``: the subset this project uses. Mask rasterisation is pycocotools'.
"""
from __future__ import annotations

import itertools
from enum import IntEnum, unique
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from torch import device as Device  # TorchScript resolves annotations by name: "torch.device" is not found

__all__ = [
    "BitMasks",
    "BoxMode",
    "Boxes",
    "ImageList",
    "Instances",
    "pairwise_intersection",
    "pairwise_ioa",
    "pairwise_iou",
    "polygons_to_bitmask",
]

_RawBoxType = Union[list[float], tuple[float, ...], torch.Tensor, np.ndarray]
_IndexType = Union[int, slice, torch.Tensor, Sequence[int]]


@unique
class BoxMode(IntEnum):
    """How a box is encoded; the values are Detectron2's (they are stored in dataset dicts)."""

    XYXY_ABS = 0  # (x0, y0, x1, y1) in pixels
    XYWH_ABS = 1  # (x0, y0, w, h) in pixels
    XYXY_REL = 2  # (x0, y0, x1, y1) relative to the image size
    XYWH_REL = 3  # (x0, y0, w, h) relative to the image size
    XYWHA_ABS = 4  # (xc, yc, w, h, angle in degrees, counter-clockwise) in pixels

    @staticmethod
    def convert(box: _RawBoxType, from_mode: "BoxMode", to_mode: "BoxMode") -> _RawBoxType:
        """Convert boxes between the absolute modes.

        Args:
            box: one box (list/tuple of 4 or 5 numbers) or ``[N, 4]`` / ``[N, 5]`` array or tensor.
        Returns:
            The converted box(es), of the same type as ``box``; a copy unless the modes are equal
            (then ``box`` itself, as in Detectron2).
        """
        from_mode, to_mode = BoxMode(from_mode), BoxMode(to_mode)
        if from_mode == to_mode:
            return box
        relative = (BoxMode.XYXY_REL, BoxMode.XYWH_REL)
        if from_mode in relative or to_mode in relative:
            raise NotImplementedError(
                f"BoxMode.convert({from_mode.name} -> {to_mode.name}): relative modes need the image size; "
                "convert to an absolute mode (XYXY_ABS, XYWH_ABS, XYWHA_ABS) yourself first."
            )

        original_type = type(box)
        single_box = isinstance(box, (list, tuple))
        if single_box:
            if len(box) not in (4, 5):
                raise ValueError(
                    f"BoxMode.convert got a {original_type.__name__} of {len(box)} numbers; a single box is 4 "
                    "numbers (5 for XYWHA_ABS). Pass several boxes as an [N, 4] array or tensor."
                )
            arr = torch.tensor(box, dtype=torch.float64)[None, :]
        elif isinstance(box, np.ndarray):
            arr = torch.from_numpy(np.ascontiguousarray(box)).clone()
        elif isinstance(box, torch.Tensor):
            arr = box.clone()
        else:
            raise TypeError(f"BoxMode.convert got a {original_type.__name__}; expected list, tuple, ndarray or Tensor.")
        if arr.dim() != 2 or arr.shape[1] not in (4, 5):
            raise ValueError(
                f"BoxMode.convert got boxes of shape {tuple(arr.shape)}; expected [N, 4] (or [N, 5] for XYWHA_ABS)."
            )

        # The conversions Detectron2 has, computed as it does (rotated ones in float64, then back).
        if from_mode == BoxMode.XYWHA_ABS and to_mode == BoxMode.XYXY_ABS:
            # The axis-aligned box enclosing the rotated one.
            dtype, arr = arr.dtype, arr.double()
            w, h, angle = arr[:, 2], arr[:, 3], arr[:, 4]
            cos, sin = torch.cos(angle * np.pi / 180.0).abs(), torch.sin(angle * np.pi / 180.0).abs()
            new_w, new_h = cos * w + sin * h, cos * h + sin * w
            x0, y0 = arr[:, 0] - new_w / 2.0, arr[:, 1] - new_h / 2.0
            arr = torch.stack([x0, y0, x0 + new_w, y0 + new_h], dim=1).to(dtype)
        elif from_mode == BoxMode.XYWH_ABS and to_mode == BoxMode.XYWHA_ABS:
            dtype, arr = arr.dtype, arr.double()
            arr[:, 0] += arr[:, 2] / 2.0
            arr[:, 1] += arr[:, 3] / 2.0
            arr = torch.cat([arr, arr.new_zeros((arr.shape[0], 1))], dim=1).to(dtype)
        elif from_mode == BoxMode.XYWH_ABS and to_mode == BoxMode.XYXY_ABS:
            arr[:, 2] += arr[:, 0]
            arr[:, 3] += arr[:, 1]
        elif from_mode == BoxMode.XYXY_ABS and to_mode == BoxMode.XYWH_ABS:
            arr[:, 2] -= arr[:, 0]
            arr[:, 3] -= arr[:, 1]
        else:
            raise NotImplementedError(
                f"Conversion from BoxMode {from_mode.name} to {to_mode.name} is not supported (nor in Detectron2); "
                "convert through XYWH_ABS."
            )
        return _restore_type(arr, original_type, single_box)


def _restore_type(arr: torch.Tensor, original_type: type, single_box: bool) -> _RawBoxType:
    if single_box:
        return original_type(arr.flatten().tolist())
    if original_type is np.ndarray:
        return arr.numpy()
    return arr


class Boxes:
    """N axis-aligned boxes, ``tensor: [N, 4]`` float32, (x0, y0, x1, y1) in pixels.

    TorchScript can compile it (``torch.jit.script`` of functions that build and use Boxes), as in
    Detectron2; eagerly, the constructor also takes a numpy array or a nested list.
    """

    def __init__(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(np.asarray(tensor, dtype=np.float32), dtype=torch.float32)
        else:
            tensor = tensor.to(torch.float32)
        if tensor.numel() == 0:
            tensor = tensor.reshape((-1, 4))
        if tensor.dim() != 2 or tensor.size(-1) != 4:
            raise ValueError(f"Boxes expects a [N, 4] tensor (x0, y0, x1, y1); got shape {tensor.shape}.")
        self.tensor = tensor

    def clone(self) -> "Boxes":
        return Boxes(self.tensor.clone())

    def to(self, device: Device) -> "Boxes":
        """Boxes on ``device`` (a torch.device or, eagerly, a string such as ``"cpu"``)."""
        return Boxes(self.tensor.to(device=device))

    @property
    def device(self) -> Device:
        return self.tensor.device

    def area(self) -> torch.Tensor:
        """``[N]`` float32 areas (negative extents are not clamped, as in Detectron2)."""
        t = self.tensor
        return (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])

    def clip(self, box_size: tuple[int, int]) -> None:
        """Clip in place to the image ``box_size = (height, width)``."""
        if not bool(torch.isfinite(self.tensor).all()):
            raise ValueError("Boxes.clip: the boxes contain inf or nan; fix the predictions that produced them.")
        h, w = box_size
        self.tensor[:, 0].clamp_(min=0, max=w)
        self.tensor[:, 1].clamp_(min=0, max=h)
        self.tensor[:, 2].clamp_(min=0, max=w)
        self.tensor[:, 3].clamp_(min=0, max=h)

    def nonempty(self, threshold: float = 0.0) -> torch.Tensor:
        """``[N]`` bool: width and height both larger than ``threshold``."""
        t = self.tensor
        return ((t[:, 2] - t[:, 0]) > threshold) & ((t[:, 3] - t[:, 1]) > threshold)

    def inside_box(self, box_size: tuple[int, int], boundary_threshold: int = 0) -> torch.Tensor:
        """``[N]`` bool: the box lies inside the image ``(height, width)``, up to ``boundary_threshold`` px."""
        h, w = box_size
        t, b = self.tensor, boundary_threshold
        return (t[:, 0] >= -b) & (t[:, 1] >= -b) & (t[:, 2] < w + b) & (t[:, 3] < h + b)

    def get_centers(self) -> torch.Tensor:
        """``[N, 2]`` box centres (x, y)."""
        return (self.tensor[:, :2] + self.tensor[:, 2:]) / 2

    def scale(self, scale_x: float, scale_y: float) -> None:
        """Scale in place (x coordinates by ``scale_x``, y by ``scale_y``)."""
        self.tensor[:, 0::2] *= scale_x
        self.tensor[:, 1::2] *= scale_y

    def __getitem__(self, item) -> "Boxes":
        """An int, slice, ``[N]`` bool mask or index tensor; always returns ``Boxes`` (a view when possible)."""
        if isinstance(item, int):
            return Boxes(self.tensor[item].view(1, -1))
        selected = self.tensor[item]
        if selected.dim() != 2:
            raise IndexError(f"Indexing Boxes gave shape {selected.shape}; expected [K, 4].")
        return Boxes(selected)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @torch.jit.unused
    def __iter__(self):
        """Yield each box as a ``[4]`` tensor."""
        yield from self.tensor

    def __repr__(self) -> str:
        return "Boxes(" + str(self.tensor) + ")"

    @classmethod
    def cat(cls, boxes_list: list["Boxes"]) -> "Boxes":
        """Concatenate a list of Boxes (an empty list gives empty Boxes)."""
        if not isinstance(boxes_list, (list, tuple)) or not all([isinstance(b, Boxes) for b in boxes_list]):
            raise TypeError("Boxes.cat expects a list of Boxes.")
        if len(boxes_list) == 0:
            return cls(torch.empty(0))
        return cls(torch.cat([b.tensor for b in boxes_list], dim=0))


def pairwise_intersection(boxes1: Boxes, boxes2: Boxes) -> torch.Tensor:
    """``[N, M]`` intersection areas of every pair."""
    b1, b2 = boxes1.tensor, boxes2.tensor
    wh = torch.min(b1[:, None, 2:], b2[None, :, 2:]) - torch.max(b1[:, None, :2], b2[None, :, :2])
    return wh.clamp_(min=0).prod(dim=2)


def pairwise_iou(boxes1: Boxes, boxes2: Boxes) -> torch.Tensor:
    """``[N, M]`` intersection over union of every pair (0 where the union is empty)."""
    inter = pairwise_intersection(boxes1, boxes2)
    union = boxes1.area()[:, None] + boxes2.area()[None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros(1, dtype=inter.dtype, device=inter.device))


def pairwise_ioa(boxes1: Boxes, boxes2: Boxes) -> torch.Tensor:
    """``[N, M]`` intersection over the area of ``boxes2[j]`` (0 where the intersection is empty)."""
    inter = pairwise_intersection(boxes1, boxes2)
    area2 = boxes2.area()[None, :]
    return torch.where(inter > 0, inter / area2, torch.zeros(1, dtype=inter.dtype, device=inter.device))


def polygons_to_bitmask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterise the union of ``polygons`` (each a flat ``[2K]`` x,y array) to a ``[height, width]`` bool mask."""
    if len(polygons) == 0:
        return np.zeros((height, width), dtype=bool)
    rles = mask_util.frPyObjects([np.asarray(p, dtype=np.float64).ravel().tolist() for p in polygons], height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


class BitMasks:
    """N binary masks of one image, ``tensor: [N, H, W]`` bool."""

    def __init__(self, tensor: Union[torch.Tensor, np.ndarray]):
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.to(torch.bool)
        else:
            tensor = torch.as_tensor(np.asarray(tensor), dtype=torch.bool)
        if tensor.dim() != 3:
            raise ValueError(f"BitMasks expects a [N, H, W] tensor; got shape {tuple(tensor.shape)}.")
        self.tensor = tensor
        self.image_size = tuple(tensor.shape[1:])

    def to(self, *args: Any, **kwargs: Any) -> "BitMasks":
        return BitMasks(self.tensor.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def __getitem__(self, item: _IndexType) -> "BitMasks":
        """An int, slice, ``[N]`` bool mask or index tensor; always returns ``BitMasks``."""
        if isinstance(item, int):
            return BitMasks(self.tensor[item].unsqueeze(0))
        selected = self.tensor[item]
        if selected.dim() != 3:
            raise IndexError(f"Indexing BitMasks with {item!r} gave shape {tuple(selected.shape)}; expected [K, H, W].")
        return BitMasks(selected)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self.tensor

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __repr__(self) -> str:
        return f"BitMasks(num_instances={len(self)})"

    def nonempty(self) -> torch.Tensor:
        """``[N]`` bool: the mask has at least one pixel."""
        return self.tensor.flatten(1).any(dim=1)

    def get_bounding_boxes(self) -> Boxes:
        """Tight boxes ``[N, 4]`` (x0, y0, x1 + 1, y1 + 1); all zeros for an empty mask."""
        n, h, w = self.tensor.shape
        boxes = torch.zeros(n, 4, dtype=torch.float32, device=self.tensor.device)
        if n == 0:
            return Boxes(boxes)
        x_any = self.tensor.any(dim=1)  # [N, W]
        y_any = self.tensor.any(dim=2)  # [N, H]
        # argmax of a bool row is its first True; on the flipped row, the last True counted from the end.
        x0 = x_any.to(torch.uint8).argmax(dim=1)
        x1 = w - x_any.flip(1).to(torch.uint8).argmax(dim=1)
        y0 = y_any.to(torch.uint8).argmax(dim=1)
        y1 = h - y_any.flip(1).to(torch.uint8).argmax(dim=1)
        found = x_any.any(dim=1)
        boxes[found] = torch.stack([x0, y0, x1, y1], dim=1)[found].to(torch.float32)
        return Boxes(boxes)

    @staticmethod
    def from_polygon_masks(polygon_masks: Any, height: int, width: int) -> "BitMasks":
        """Rasterise instances given as polygons: a list (one entry per instance) of lists of flat
        ``[2K]`` x,y arrays, or an object with such a ``polygons`` attribute (Detectron2's PolygonMasks)."""
        polygons = getattr(polygon_masks, "polygons", polygon_masks)
        masks = [torch.from_numpy(polygons_to_bitmask(p, height, width)) for p in polygons]
        if not masks:
            return BitMasks(torch.empty(0, height, width, dtype=torch.bool))
        return BitMasks(torch.stack(masks))

    @staticmethod
    def cat(bitmasks_list: Sequence["BitMasks"]) -> "BitMasks":
        if not isinstance(bitmasks_list, (list, tuple)) or len(bitmasks_list) == 0:
            raise ValueError("BitMasks.cat expects a non-empty list of BitMasks.")
        if not all(isinstance(m, BitMasks) for m in bitmasks_list):
            raise TypeError(f"BitMasks.cat got {[type(m).__name__ for m in bitmasks_list]}; expected BitMasks only.")
        return BitMasks(torch.cat([m.tensor for m in bitmasks_list], dim=0))


class ImageList:
    """Images of different sizes padded into one tensor.

    Attributes:
        tensor: ``[N, C, H_max, W_max]`` (or ``[N, H_max, W_max]``) padded batch.
        image_sizes: ``(h, w)`` of each image before padding.

    TorchScript can compile it, and :meth:`from_tensors` can be traced: under ``torch.jit.trace``
    the sizes are computed from tensors (``image_sizes`` then holds ``[2]`` tensors), so a traced
    function pads inputs of other sizes correctly, as in Detectron2.
    """

    def __init__(self, tensor: torch.Tensor, image_sizes: list[tuple[int, int]]):
        self.tensor = tensor
        self.image_sizes = image_sizes

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, idx) -> torch.Tensor:
        """The ``idx``-th image without its padding: ``[C, h, w]``."""
        size = self.image_sizes[idx]
        return self.tensor[idx, ..., : size[0], : size[1]]

    @torch.jit.unused
    def to(self, *args: Any, **kwargs: Any) -> "ImageList":
        return ImageList(self.tensor.to(*args, **kwargs), self.image_sizes)

    @property
    def device(self) -> Device:
        return self.tensor.device

    @staticmethod
    def from_tensors(
        tensors: list[torch.Tensor],
        size_divisibility: int = 0,
        pad_value: float = 0.0,
        padding_constraints: Optional[dict[str, int]] = None,
    ) -> "ImageList":
        """Pad ``tensors`` (each ``[..., h_i, w_i]``, same leading dims) at the bottom/right into one batch.

        The padded size is the largest ``(h, w)``, or ``square_size`` x ``square_size`` when
        ``padding_constraints["square_size"]`` is set, then rounded up to a multiple of the
        divisibility (``padding_constraints["size_divisibility"]`` overrides ``size_divisibility``).
        """
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors got an empty list; pass at least one image tensor.")
        leading = tensors[0].shape[:-2]
        for i, t in enumerate(tensors):
            if t.shape[:-2] != leading:
                raise ValueError(
                    f"ImageList.from_tensors: image {i} has shape {t.shape} but image 0 has {tensors[0].shape}; "
                    "all images need the same leading (channel) dims."
                )
        image_sizes = [(t.shape[-2], t.shape[-1]) for t in tensors]
        # Under tracing, shape entries are tensors: computing the padded size with tensor ops keeps it
        # a function of the input sizes instead of a constant of the trace.
        size_tensors = [_size_tensor(t) for t in tensors]
        max_size = torch.stack(size_tensors).max(0).values
        if padding_constraints is not None:
            square_size = padding_constraints.get("square_size", 0)
            if square_size > 0:
                if bool((max_size > square_size).any()):
                    raise ValueError(
                        f"ImageList.from_tensors: an image of size {int(max_size[0])}x{int(max_size[1])} does not fit the square_size "
                        f"{square_size} padding constraint; resize images to at most {square_size} px first."
                    )
                max_size = torch.full_like(max_size, square_size)
            if "size_divisibility" in padding_constraints:
                size_divisibility = padding_constraints["size_divisibility"]
        if size_divisibility > 1:
            stride = size_divisibility
            max_size = (max_size + (stride - 1)).div(stride, rounding_mode="floor") * stride
        if torch.jit.is_scripting():
            padded: list[int] = max_size.to(dtype=torch.long).tolist()
        elif torch.jit.is_tracing():
            padded = max_size
            image_sizes = size_tensors
        else:
            padded = max_size.tolist()

        if len(tensors) == 1:
            h, w = image_sizes[0]
            batched = F.pad(tensors[0], [0, padded[-1] - w, 0, padded[-2] - h], value=pad_value).unsqueeze(0)
        else:
            batched = tensors[0].new_full([len(tensors)] + list(leading) + [padded[0], padded[1]], pad_value)
            for i, img in enumerate(tensors):
                batched[i, ..., : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batched.contiguous(), image_sizes)


def _size_tensor(image: torch.Tensor) -> torch.Tensor:
    """``[2]`` long tensor ``(h, w)`` of ``image`` (computed from the traced shape under tracing)."""
    if torch.jit.is_scripting():
        return torch.tensor([image.shape[-2], image.shape[-1]])
    if torch.jit.is_tracing():
        return torch._shape_as_tensor(image)[-2:]
    return torch.tensor(image.shape[-2:])


class Instances:
    """Per-instance fields of one image, all of the same length N.

    Fields are set and read as attributes (``inst.pred_boxes = Boxes(...)``) or with
    :meth:`set`/:meth:`get`; a field is anything with ``__len__`` and ``__getitem__`` (tensors,
    Boxes, BitMasks, lists). ``image_size`` is ``(height, width)``.
    """

    def __init__(self, image_size: tuple[int, int], **kwargs: Any):
        self._image_size = image_size
        self._fields: dict[str, Any] = {}
        for k, v in kwargs.items():
            self.set(k, v)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def __setattr__(self, name: str, val: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, val)
        else:
            self.set(name, val)

    def __getattr__(self, name: str) -> Any:
        if name == "_fields" or name not in self._fields:
            raise AttributeError(f"Cannot find field '{name}' in the given Instances!")
        return self._fields[name]

    def set(self, name: str, value: Any) -> None:
        """Set field ``name``; its length must equal that of the fields already present."""
        data_len = len(value)
        if self._fields and len(self) != data_len:
            raise ValueError(f"Adding a field '{name}' of length {data_len} to a Instances of length {len(self)}.")
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def remove(self, name: str) -> None:
        del self._fields[name]

    def get(self, name: str) -> Any:
        return self._fields[name]

    def get_fields(self) -> dict[str, Any]:
        """The fields by name (the dict itself, not a copy)."""
        return self._fields

    def to(self, *args: Any, **kwargs: Any) -> "Instances":
        """A new Instances with every field that has ``.to`` moved/cast, e.g. ``to("cpu")``."""
        ret = Instances(self._image_size)
        for k, v in self._fields.items():
            if hasattr(v, "to"):
                v = v.to(*args, **kwargs)
            ret.set(k, v)
        return ret

    def __getitem__(self, item: _IndexType) -> "Instances":
        """An int (kept as an Instances of length 1), slice, ``[N]`` bool mask or index tensor."""
        if type(item) is int:
            if item >= len(self) or item < -len(self):
                raise IndexError(f"Instances index {item} out of range for length {len(self)}.")
            item = slice(item, None, len(self))
        ret = Instances(self._image_size)
        for k, v in self._fields.items():
            ret.set(k, v[item])
        return ret

    def __len__(self) -> int:
        for v in self._fields.values():
            return len(v)
        raise NotImplementedError("Empty Instances does not support __len__!")

    def __iter__(self):
        raise NotImplementedError("`Instances` object is not iterable!")

    @staticmethod
    def cat(instance_lists: list["Instances"]) -> "Instances":
        """Concatenate Instances of the same image size and the same fields."""
        if len(instance_lists) == 0 or not all(isinstance(i, Instances) for i in instance_lists):
            raise ValueError("Instances.cat expects a non-empty list of Instances.")
        if len(instance_lists) == 1:
            return instance_lists[0]
        image_size = instance_lists[0].image_size
        for i in instance_lists[1:]:
            if i.image_size != image_size:
                raise ValueError(f"Instances.cat: image sizes differ ({image_size} vs {i.image_size}).")
        ret = Instances(image_size)
        for k, v0 in instance_lists[0]._fields.items():
            values = [i.get(k) for i in instance_lists]
            if isinstance(v0, torch.Tensor):
                values = torch.cat(values, dim=0)
            elif isinstance(v0, list):
                values = list(itertools.chain(*values))
            elif hasattr(type(v0), "cat"):
                values = type(v0).cat(values)
            else:
                raise ValueError(f"Instances.cat: field '{k}' of type {type(v0).__name__} has no way to concatenate.")
            ret.set(k, values)
        return ret

    def __repr__(self) -> str:
        s = f"{self.__class__.__name__}(num_instances={len(self) if self._fields else 0}, "
        s += f"image_height={self._image_size[0]}, image_width={self._image_size[1]}, "
        s += "fields=[" + ", ".join(f"{k}: {v}" for k, v in self._fields.items()) + "])"
        return s

    __str__ = __repr__
