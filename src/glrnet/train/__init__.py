"""Training runs: a :class:`TrainConfig` in five parts (``config``), the objects it builds (``build``:
model, gradient producer, optimizer) and the loop that trains and checkpoints (``loop``)."""

from .build import build_model, build_optimizer, build_producer, input_smoothing_layer
from .config import (ARCHS, METHODS, NORMS, OPTIMIZERS, PERTURB_LAYERS, PROJECTIONS, SCHEDULES, DataConfig,
                     EstimatorConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig, parse_arch, parse_perturb,
                     resolve_device, unused_options)
from .loop import HISTORY_FIELDS, check_resumable, evaluate, train

__all__ = ["ARCHS", "DataConfig", "EstimatorConfig", "EvalConfig", "HISTORY_FIELDS", "METHODS", "ModelConfig",
           "NORMS", "OPTIMIZERS", "OptimConfig", "PERTURB_LAYERS", "PROJECTIONS", "SCHEDULES", "TrainConfig",
           "build_model", "build_optimizer", "build_producer", "check_resumable", "evaluate", "input_smoothing_layer",
           "parse_arch", "parse_perturb", "resolve_device", "train", "unused_options"]
