"""LazyConfig through the seam: relative imports, instantiate, overrides, save/load round trip."""
import collections
import os

import cloudpickle
import pytest
import torch
from omegaconf import DictConfig

from samantics_d2.config import check_override_keys, load_config
from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import LazyConfig, ShapeSpec, instantiate

HERE = os.path.dirname(__file__)
CHILD = os.path.join(HERE, "configs_fixture", "exp", "child.py")


def test_relative_import_and_instantiate():
    cfg = LazyConfig.load(CHILD)
    assert isinstance(cfg.model, DictConfig)
    assert cfg.train.max_iter == 20 and cfg.train.nested.lr == 0.1
    assert list(cfg.extra.items_) == [1, 2, 3]
    model = instantiate(cfg.model)
    assert model == collections.OrderedDict(depth=2, width=16)
    # The base file is untouched by the child's edits.
    base = LazyConfig.load(os.path.join(HERE, "configs_fixture", "common", "base.py"))
    assert base.model.width == 8 and base.train.max_iter == 10
    assert LazyConfig.load(CHILD, keys="train").max_iter == 20


def test_instantiate_nested_lists_and_plain_dicts():
    node = L(collections.OrderedDict)(layers=[L(torch.nn.Linear)(in_features=2, out_features=3)], plain=dict(a=1))
    out = instantiate(node)
    assert isinstance(out["layers"][0], torch.nn.Linear)
    assert out["plain"]["a"] == 1
    assert isinstance(instantiate(L("torch.nn.ReLU")()), torch.nn.ReLU)
    with pytest.raises(ImportError, match="no_such_module"):
        instantiate(L("no_such_module.Thing")(x=1))


def test_overrides_and_strict_key_check():
    cfg = LazyConfig.load(CHILD)
    LazyConfig.apply_overrides(cfg, ["train.max_iter=7", "train.nested.lr=0.5", "model.width=4"])
    assert cfg.train.max_iter == 7 and cfg.train.nested.lr == 0.5 and cfg.model.width == 4
    check_override_keys(cfg, ["train.max_iter=3"])
    with pytest.raises(KeyError, match=r"train\.max_itr.*train\.max_iter"):
        check_override_keys(cfg, ["train.max_itr=3"])
    # Detectron2 semantics: apply_overrides itself adds a new key silently.
    LazyConfig.apply_overrides(cfg, ["train.brand_new=1"])
    assert cfg.train.brand_new == 1


def test_load_config_checks_and_applies_overrides():
    cfg = load_config(CHILD, ["train.max_iter=7"])
    assert cfg.train.max_iter == 7 and cfg.model.width == 16
    with pytest.raises(KeyError, match=r"train\.max_itr.*train\.max_iter"):
        load_config(CHILD, ["train.max_itr=3"])


def test_user_tools_drop_empty_masks_unless_the_user_says_otherwise():
    """segment.py and the web app load their config with user_tool=True: empty masks are dropped
    (USER_TOOL_OVERRIDES), an override of the user wins, and evaluation configs stay as written."""
    config = os.path.join(HERE, os.pardir, "configs", "training_free", "shapes_tiny_random.py")
    assert load_config(config).model.drop_empty_masks is False  # as written (No Time to Train's)
    assert load_config(config, user_tool=True).model.drop_empty_masks is True
    assert load_config(config, ["model.drop_empty_masks=False"], user_tool=True).model.drop_empty_masks is False
    # a model without the option (RefSAM, built through **options) is left as written: segment.py runs it
    ref_sam = os.path.join(HERE, os.pardir, "configs", "ref_sam", "tiny_shapes.py")
    assert "drop_empty_masks" not in load_config(ref_sam, user_tool=True).model


def test_override_of_lazycall_argument_left_at_default():
    cfg = DictConfig({"layer": L(torch.nn.Linear)(in_features=2, out_features=3)}, flags={"allow_objects": True})
    check_override_keys(cfg, ["layer.bias=false"])  # Linear(bias=...) exists in the signature
    with pytest.raises(KeyError, match="layer.biass"):
        check_override_keys(cfg, ["layer.biass=false"])


def test_save_load_round_trip(tmp_path):
    cfg = LazyConfig.load(CHILD)
    cfg.layer = L(torch.nn.Linear)(in_features=2, out_features=3)
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    again = LazyConfig.load(str(path))
    assert again.train.max_iter == 20 and again.model.width == 16
    assert again.layer._target_ in ("torch.nn.Linear", "torch.nn.modules.linear.Linear")
    assert isinstance(instantiate(again.layer), torch.nn.Linear)
    assert instantiate(again.model) == instantiate(cfg.model)


def test_configs_saved_by_either_backend_load_in_both(tmp_path):
    # Saved with Detectron2, a config names detectron2.* targets; lite maps those to the seam's objects.
    path = tmp_path / "saved.yaml"
    path.write_text(
        "from_detectron2: {_target_: detectron2.modeling.ShapeSpec, channels: 3}\n"
        "from_lite: {_target_: samantics_d2.d2.ShapeSpec, channels: 4}\n"
        "unknown: {_target_: detectron2.no_such_module.Thing}\n"
    )
    cfg = LazyConfig.load(str(path))
    for key, channels in (("from_detectron2", 3), ("from_lite", 4)):
        shape = instantiate(cfg[key])
        assert isinstance(shape, ShapeSpec) and shape.channels == channels
    with pytest.raises(ImportError, match="detectron2.no_such_module.Thing"):
        instantiate(cfg.unknown)
    # and what either backend saves names the seam's object in a way both backends resolve
    LazyConfig.save(DictConfig({"shape": L(ShapeSpec)(channels=5)}), str(path))
    assert LazyConfig.load(str(path)).shape._target_.startswith(("samantics_d2.d2.", "detectron2."))


def test_config_yaml_cannot_hold_is_also_pickled(tmp_path):
    # Detectron2's behaviour: the YAML is written, and the config is pickled next to it.
    cfg = DictConfig({"f": L(collections.OrderedDict)(fn=lambda x: x + 1)}, flags={"allow_objects": True})
    path = tmp_path / "bad.yaml"
    LazyConfig.save(cfg, str(path))
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml", "bad.yaml.pkl"]  # no temporary file left
    with open(str(path) + ".pkl", "rb") as f:
        again = cloudpickle.load(f)
    assert instantiate(again.f)["fn"](1) == 2


def test_dataclass_argument_survives_save_and_load(tmp_path):
    cfg = L(collections.OrderedDict)(shape=ShapeSpec(channels=3, stride=16))
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    for c in (cfg, LazyConfig.load(str(path))):
        shape = instantiate(c)["shape"]
        assert isinstance(shape, ShapeSpec) and shape.channels == 3 and shape.stride == 16 and shape.height is None


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        LazyConfig.load(str(tmp_path / "nope.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("from .missing import x\n")
    with pytest.raises(ImportError, match="missing.py"):
        LazyConfig.load(str(broken))
