"""Dataset dicts and data loaders, as ``detectron2.data.build`` / ``common`` / ``samplers``.

All on ``torch.utils.data``: ``DatasetFromList`` and ``MapDataset`` are map-style datasets, the
samplers decide which indices this rank reads (``TrainingSampler``: infinite, shuffled with a seed
shared by all ranks, rank ``r`` takes every ``world_size``-th index; ``InferenceSampler``: a
contiguous shard per rank), and ``DataLoader`` does the batching and the workers.
"""
from __future__ import annotations

import itertools
import logging
import pickle
import random
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import cloudpickle
import numpy as np
import torch
import torch.utils.data as torchdata

from .. import comm
from .catalog import DatasetCatalog, MetadataCatalog

__all__ = [
    "AspectRatioGroupedDataset",
    "DatasetFromList",
    "InferenceSampler",
    "MapDataset",
    "TrainingSampler",
    "build_batch_data_loader",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "get_detection_dataset_dicts",
    "trivial_batch_collator",
    "worker_init_reset_seed",
]

logger = logging.getLogger(__name__)


class _SerializedList:
    """A list pickled into one numpy byte buffer: data-loader workers share the buffer instead of
    each touching (and so copying) millions of Python objects."""

    def __init__(self, lst: list):
        chunks = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for x in lst]
        self._ends = np.cumsum([len(c) for c in chunks], dtype=np.int64)
        self._buffer = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
        logger.info("Serialized %d dataset items into %.2f MiB.", len(lst), self._buffer.nbytes / 2**20)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, idx: int) -> Any:
        start = 0 if idx == 0 else int(self._ends[idx - 1])
        return pickle.loads(memoryview(self._buffer[start : int(self._ends[idx])]))


class DatasetFromList(torchdata.Dataset):
    """A map-style dataset over a list.

    Args:
        lst: the items.
        copy: without serialization, return a deep copy of each item (so callers may edit it).
        serialize: True (default) stores the items pickled in one buffer (``_SerializedList``); a
            callable ``serialize(lst)`` stores what it returns (indexable) instead; False keeps ``lst``.
    """

    def __init__(self, lst: list, copy: bool = True, serialize: Union[bool, Callable[[list], Any]] = True):
        self._copy = copy
        self._serialize = bool(serialize)
        if callable(serialize):
            self._lst = serialize(lst)
        elif serialize:
            self._lst = _SerializedList(lst)
        else:
            self._lst = lst

    def __len__(self) -> int:
        return len(self._lst)

    def __getitem__(self, idx: int) -> Any:
        if self._copy and not self._serialize:
            return pickle.loads(pickle.dumps(self._lst[idx]))
        return self._lst[idx]


class _CloudpickledCallable:
    """A callable that pickles with cloudpickle, so that a lambda or a local function can be sent
    to data-loader workers started with "spawn" (macOS, Windows, Linux from Python 3.14)."""

    def __init__(self, func: Callable[..., Any]):
        self._func = func._func if isinstance(func, _CloudpickledCallable) else func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __reduce__(self) -> tuple:
        # Unpickles as the plain function (the receiving side needs no wrapper).
        return cloudpickle.loads, (cloudpickle.dumps(self._func),)

    def __repr__(self) -> str:
        return repr(self._func)


class MapDataset(torchdata.Dataset):
    """``map_func`` applied to every item of a dataset.

    For a map-style dataset, when ``map_func`` returns None (e.g. an image left without
    instances), another index, drawn at random among those not known to fail, is tried instead.
    Given an iterable dataset, ``MapDataset(...)`` is an iterable dataset that skips such items.
    ``map_func`` is pickled with cloudpickle, so a lambda works with spawned workers.
    """

    def __new__(cls, dataset: torchdata.Dataset, map_func: Callable[[Any], Any]):
        if isinstance(dataset, torchdata.IterableDataset):
            return _MapIterableDataset(dataset, map_func)
        return super().__new__(cls)

    def __init__(self, dataset: torchdata.Dataset, map_func: Callable[[Any], Any]):
        self._dataset = dataset
        self._map_func = _CloudpickledCallable(map_func)
        self._rng = random.Random(42)
        self._failed: set[int] = set()

    def __getnewargs__(self) -> tuple:
        return self._dataset, self._map_func

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, idx: int) -> Any:
        index, retry = int(idx), 0
        while True:
            data = self._map_func(self._dataset[index])
            if data is not None:
                return data
            self._failed.add(index)
            if len(self._failed) >= len(self):
                raise RuntimeError(
                    f"The mapper {self._map_func!r} returned None for every one of the {len(self)} items; check the "
                    "dataset and the augmentations (e.g. crops that leave no instance)."
                )
            if retry >= 2:
                logger.warning("The mapper returned None for index %d (retry %d); trying another index.", index, retry)
            retry += 1
            index = self._rng.randrange(len(self))
            while index in self._failed:
                index = self._rng.randrange(len(self))


class _MapIterableDataset(torchdata.IterableDataset):
    """``map_func`` applied to every item of an iterable dataset; items it maps to None are skipped."""

    def __init__(self, dataset: torchdata.IterableDataset, map_func: Callable[[Any], Any]):
        self._dataset = dataset
        self._map_func = _CloudpickledCallable(map_func)

    def __len__(self) -> int:
        return len(self._dataset)

    def __iter__(self) -> Iterator[Any]:
        for item in self._dataset:
            data = self._map_func(item)
            if data is not None:
                yield data


class TrainingSampler(torchdata.Sampler):
    """An infinite stream of indices in ``[0, size)``: one (shuffled) pass after another.

    All ranks draw the same permutations (same seed) and rank ``r`` takes the indices at positions
    ``r, r + world_size, ...``, so the ranks read disjoint parts of each pass.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"TrainingSampler got size={size!r}; expected a positive int (the dataset length).")
        self._size = size
        self._shuffle = shuffle
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=generator).tolist()
            else:
                yield from range(self._size)


class InferenceSampler(torchdata.Sampler):
    """Indices of this rank's shard: ranks get contiguous, near-equal shards, in order, not padded."""

    def __init__(self, size: int):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"InferenceSampler got size={size!r}; expected a positive int (the dataset length).")
        self._local_indices = self._get_local_indices(size, comm.get_world_size(), comm.get_rank())

    @staticmethod
    def _get_local_indices(total_size: int, world_size: int, rank: int) -> range:
        """The shard of ``rank``: the first ``total_size % world_size`` ranks get one index more."""
        shard, extra = divmod(total_size, world_size)
        begin = rank * shard + min(rank, extra)
        return range(begin, begin + shard + (1 if rank < extra else 0))

    def __iter__(self) -> Iterator[int]:
        return iter(self._local_indices)

    def __len__(self) -> int:
        return len(self._local_indices)


class AspectRatioGroupedDataset(torchdata.IterableDataset):
    """Batches of ``batch_size`` dicts that are all landscape (``width > height``) or all not."""

    def __init__(self, dataset: Any, batch_size: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self._buckets: list[list] = [[], []]

    def __iter__(self) -> Iterator[list]:
        for d in self.dataset:
            bucket = self._buckets[0 if d["width"] > d["height"] else 1]
            bucket.append(d)
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                yield batch


def trivial_batch_collator(batch: list) -> list:
    """A batch stays a list of dicts."""
    return batch


def _no_collation(item: Any) -> Any:
    return item


def worker_init_reset_seed(worker_id: int) -> None:
    """Seed ``random``, numpy and torch in a data-loader worker from the seed torch gave it."""
    seed = (torch.initial_seed() + worker_id) % 2**31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_names(names: Union[str, Sequence[str]]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("get_detection_dataset_dicts got no dataset names.")
    missing = [n for n in names if n not in DatasetCatalog]
    if missing:
        raise KeyError(
            f"Datasets {missing} are not registered. Registered datasets: {', '.join(sorted(DatasetCatalog.keys()))}."
        )
    return names


def _filter_images_with_only_crowd_annotations(dataset_dicts: list[dict], names: list[str]) -> list[dict]:
    kept = [d for d in dataset_dicts if any(a.get("iscrowd", 0) == 0 for a in d["annotations"])]
    logger.info(
        "Removed %d images with no usable annotations from %s. %d images left.",
        len(dataset_dicts) - len(kept),
        names,
        len(kept),
    )
    return kept


def _filter_images_with_few_keypoints(dataset_dicts: list[dict], min_keypoints: int) -> list[dict]:
    def visible_keypoints(d: dict) -> int:
        return sum(int((np.asarray(a["keypoints"])[2::3] > 0).sum()) for a in d["annotations"] if "keypoints" in a)

    kept = [d for d in dataset_dicts if visible_keypoints(d) >= min_keypoints]
    logger.info("Removed %d images with fewer than %d keypoints.", len(dataset_dicts) - len(kept), min_keypoints)
    return kept


def get_detection_dataset_dicts(
    names: Union[str, Sequence[str]],
    filter_empty: bool = True,
    min_keypoints: int = 0,
    proposal_files: Optional[list[str]] = None,
    check_consistency: bool = True,
) -> Union[list[dict], torchdata.Dataset]:
    """The dataset dicts of one or several registered datasets, concatenated.

    Args:
        names: dataset name(s) registered in ``DatasetCatalog``.
        filter_empty: drop images without any non-crowd annotation (logged).
        min_keypoints: drop images with fewer visible keypoints (0: keep all).
        proposal_files: precomputed proposals; not supported by lite (must be None).
        check_consistency: the datasets must share ``thing_classes``; logs the per-class instance count
            (AssertionError, as in Detectron2, for a ``category_id`` outside ``thing_classes``).
    """
    names = _check_names(names)
    if proposal_files is not None:
        raise NotImplementedError(
            "samantics_d2.lite does not load precomputed proposal files; pass proposal_files=None (this project "
            "computes proposals in the model) or use Detectron2."
        )
    loaded = [DatasetCatalog.get(name) for name in names]
    if isinstance(loaded[0], torchdata.Dataset):
        return torchdata.ConcatDataset(loaded) if len(loaded) > 1 else loaded[0]
    for name, dicts in zip(names, loaded):
        if len(dicts) == 0:
            raise ValueError(f"Dataset {name!r} is empty: its loader returned no images.")
    dataset_dicts = list(itertools.chain.from_iterable(loaded))
    has_instances = "annotations" in dataset_dicts[0]
    if filter_empty and has_instances:
        dataset_dicts = _filter_images_with_only_crowd_annotations(dataset_dicts, names)
    if min_keypoints > 0 and has_instances:
        dataset_dicts = _filter_images_with_few_keypoints(dataset_dicts, min_keypoints)
    if check_consistency and has_instances:
        classes = [MetadataCatalog.get(n).get("thing_classes") for n in names]
        if classes[0] is not None:
            for name, other in zip(names[1:], classes[1:]):
                if other != classes[0]:
                    raise ValueError(
                        f"Datasets {names[0]!r} and {name!r} have different thing_classes ({classes[0]} vs {other}); "
                        "they cannot be trained on together."
                    )
            counts = Counter(
                a["category_id"] for d in dataset_dicts for a in d["annotations"] if not a.get("iscrowd", 0)
            )
            invalid = sorted(k for k in counts if not 0 <= k < len(classes[0]))
            if invalid:
                # AssertionError, as Detectron2's class histogram raises.
                raise AssertionError(
                    f"Got an invalid category_id={invalid[0]} for a dataset of {len(classes[0])} classes in {names}: "
                    f"category ids must be contiguous indices 0..{len(classes[0]) - 1} into thing_classes "
                    "(load_coco_json maps COCO ids to them when the metadata has thing_dataset_id_to_contiguous_id)."
                )
            logger.info(
                "%d instances of %d classes in %s: %s",
                sum(counts.values()),
                len(classes[0]),
                names,
                ", ".join(f"{classes[0][k]}: {counts[k]}" for k in sorted(counts)),
            )
    if not dataset_dicts:
        raise ValueError(
            f"No images left in {names} after filtering (filter_empty={filter_empty}, min_keypoints={min_keypoints})."
        )
    return dataset_dicts


def _as_dataset(
    dataset: Union[list, torchdata.Dataset], mapper: Optional[Callable], *, copy: bool
) -> torchdata.Dataset:
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=copy)
    elif not isinstance(dataset, torchdata.Dataset):
        raise TypeError(f"Expected a list of dataset dicts or a torch Dataset; got {type(dataset).__name__}.")
    return dataset if mapper is None else MapDataset(dataset, mapper)


def build_batch_data_loader(
    dataset: torchdata.Dataset,
    sampler: Optional[torchdata.Sampler],
    total_batch_size: int,
    *,
    aspect_ratio_grouping: bool = False,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
    drop_last: bool = True,
    single_gpu_batch_size: Optional[int] = None,
    prefetch_factor: Optional[int] = 2,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    seed: Optional[int] = None,
    **kwargs: Any,
) -> Any:
    """A loader of per-process batches (lists, unless ``collate_fn`` says otherwise).

    Args:
        dataset: a map-style dataset (then ``sampler`` gives the indices, e.g. the infinite
            ``TrainingSampler``) or an iterable one (then ``sampler`` must be None).
        total_batch_size: batch size summed over all processes; or give ``single_gpu_batch_size``
            (the batch of each process) instead.
        aspect_ratio_grouping: batch landscape and portrait images separately (drops incomplete batches).
        drop_last: drop the last, incomplete batch.
        prefetch_factor, persistent_workers, pin_memory, kwargs: passed to ``torch.utils.data.DataLoader``
            (``prefetch_factor`` only with workers).
        seed: seeds the loader's generator (the base seed of the workers' random state).
    """
    if single_gpu_batch_size:
        if total_batch_size:
            raise ValueError(
                f"build_batch_data_loader got total_batch_size={total_batch_size} and single_gpu_batch_size="
                f"{single_gpu_batch_size}; give only one of them."
            )
        batch_size = single_gpu_batch_size
    else:
        world_size = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world_size != 0:
            raise ValueError(
                f"total_batch_size={total_batch_size} must be a positive multiple of the number of processes "
                f"({world_size}); change dataloader.train.total_batch_size or the number of GPUs."
            )
        batch_size = total_batch_size // world_size
    if isinstance(dataset, torchdata.IterableDataset) and sampler is not None:
        raise ValueError("build_batch_data_loader got a sampler for an iterable dataset; pass sampler=None.")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    loader_kwargs = dict(
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=worker_init_reset_seed,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers,
        pin_memory=pin_memory,
        generator=generator,
        **kwargs,
    )
    if aspect_ratio_grouping:
        if not drop_last:
            raise ValueError("aspect_ratio_grouping=True drops incomplete batches; it needs drop_last=True.")
        # One item at a time, grouped into batches below.
        loader = torchdata.DataLoader(dataset, batch_size=None, collate_fn=_no_collation, **loader_kwargs)
        grouped = AspectRatioGroupedDataset(loader, batch_size)
        return grouped if collate_fn is None else MapDataset(grouped, collate_fn)
    return torchdata.DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=drop_last,
        collate_fn=trivial_batch_collator if collate_fn is None else collate_fn,
        **loader_kwargs,
    )


def build_detection_train_loader(
    dataset: Union[list, torchdata.Dataset],
    *,
    mapper: Optional[Callable[[dict], Any]],
    sampler: Optional[torchdata.Sampler] = None,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
    **kwargs: Any,
) -> Any:
    """An infinite training loader yielding lists of mapped dicts (``total_batch_size // world_size`` each).

    Args:
        dataset: a list of dataset dicts (e.g. from ``get_detection_dataset_dicts``) or a torch Dataset.
        mapper: applied to each item; an item it maps to None is replaced by another one.
        sampler: default ``TrainingSampler(len(dataset))``; must be None for an iterable dataset.
        total_batch_size: batch size summed over all processes.
        aspect_ratio_grouping: batch landscape and portrait images separately.
        kwargs: passed to :func:`build_batch_data_loader` (``drop_last``, ``prefetch_factor``,
            ``persistent_workers``, ``pin_memory``, ``seed``, ``single_gpu_batch_size``, ...).
    """
    dataset = _as_dataset(dataset, mapper, copy=False)
    if isinstance(dataset, torchdata.IterableDataset):
        if sampler is not None:
            raise ValueError("build_detection_train_loader got a sampler for an iterable dataset; pass sampler=None.")
    elif sampler is None:
        sampler = TrainingSampler(len(dataset))
    return build_batch_data_loader(
        dataset,
        sampler,
        total_batch_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
        collate_fn=collate_fn,
        **kwargs,
    )


def build_detection_test_loader(
    dataset: Union[list, torchdata.Dataset],
    *,
    mapper: Optional[Callable[[dict], Any]],
    sampler: Optional[torchdata.Sampler] = None,
    batch_size: int = 1,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
) -> torchdata.DataLoader:
    """A finite loader over this rank's shard (default ``InferenceSampler``), in dataset order."""
    dataset = _as_dataset(dataset, mapper, copy=False)
    if sampler is None and not isinstance(dataset, torchdata.IterableDataset):
        sampler = InferenceSampler(len(dataset))
    return torchdata.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator if collate_fn is None else collate_fn,
    )
