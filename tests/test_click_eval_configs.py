"""configs/click/*: the COCO configs fail clearly without weights and dataset; the tiny shapes-with-parts
config runs the ClickEvaluator on real dataloader inputs (cut to two images and three clicks here; the full
run is `python train_net.py --config-file configs/click/shapes_parts_tiny.py --eval-only`, docs/click.md)."""
from __future__ import annotations

import glob
import os

import pytest
import torch

import samantics_d2  # noqa: F401  (registers the datasets)
from samantics_d2.config import check_weights_available
from samantics_d2.d2 import DatasetCatalog, LazyConfig, instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "click", "coco_*.py")))


def test_coco_configs_name_their_weights_and_data(monkeypatch, tmp_path):
    monkeypatch.setenv("SAMANTICS_WEIGHTS", str(tmp_path))
    tags = set()
    for path in COCO_CONFIGS:
        cfg = LazyConfig.load(path)
        assert cfg.dataloader.test.dataset.names == "coco_2017_val_panoptic"
        assert (cfg.dataloader.test.mapper.short_edge, cfg.dataloader.test.mapper.max_size) == (800, 1333)
        tags.add(cfg.model.backbone.tag)
        with pytest.raises(FileNotFoundError, match="weight file"):
            check_weights_available(cfg, path)
    assert tags == {"sam_vit_b", "sam_vit_l", "sam_vit_h", "hq_sam_vit_h", "sam2.1_hiera_l"}
    noc = LazyConfig.load(os.path.join(ROOT, "configs", "click", "coco_sam_vit_h_noc.py"))
    assert noc.model.max_clicks == 20 and noc.dataloader.evaluator.max_clicks == 20  # interpolated, one value


def test_missing_coco_panoptic_is_an_error_naming_it():
    if os.path.isdir(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco", "panoptic_val2017")):
        pytest.skip("COCO panoptic is present here: nothing is missing")
    # lite names the file and DETECTRON2_DATASETS; Detectron2's own loader names the json it cannot open
    with pytest.raises((FileNotFoundError, OSError), match="panoptic_val2017"):
        DatasetCatalog.get("coco_2017_val_panoptic")


def test_shapes_parts_tiny_config_runs_the_click_evaluator(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", os.environ.get("SAMANTICS_CACHE", str(tmp_path)))
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "click", "shapes_parts_tiny.py"))
    assert cfg.dataloader.test.dataset.names == "shapes_parts_val" and cfg.model.max_clicks == 20
    cfg.model.max_clicks = 3
    cfg.dataloader.evaluator.miou_clicks = [1, 3]
    torch.manual_seed(cfg.train.seed)
    model = instantiate(cfg.model).eval()
    model.prepare_references()
    mapper = instantiate(cfg.dataloader.test.mapper)
    evaluator = instantiate(cfg.dataloader.evaluator)
    inputs = [mapper(d) for d in DatasetCatalog.get("shapes_parts_val")[:2]]
    evaluator.reset()
    evaluator.process(inputs, model(inputs))
    results = evaluator.evaluate()["click"]
    num = sum(len(x["instances"]) for x in inputs)
    assert results["num_segments"] == num and results["num_whole"] == results["num_part"] == num // 2
    assert results["Max"] <= results["Oracle"] and 1.0 <= results["NoC@90"] <= 3.0
    assert 0.0 <= results["Acc@Oracle_part"] <= 100.0 and "Acc@Max_whole" in results
