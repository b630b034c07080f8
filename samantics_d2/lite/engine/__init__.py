"""Training engine with the names of ``detectron2.engine`` (hooks live in ``samantics_d2.lite.hooks``)."""
from .defaults import create_ddp_model, default_argument_parser, default_setup, default_writers
from .launch import launch
from .predictor import DefaultPredictor
from .train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase

__all__ = [
    "AMPTrainer",
    "DefaultPredictor",
    "HookBase",
    "SimpleTrainer",
    "TrainerBase",
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "launch",
]
