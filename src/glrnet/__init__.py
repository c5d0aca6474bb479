"""glrnet: train noisy neural networks by the generalized likelihood ratio (GLR) method.

Data flows one way: batch → noisy forward (K replications) → per-replication losses
→ estimator → ``param.grad`` → any ``torch.optim`` optimizer.
"""

from .activations import ACTIVATIONS, Sigmoid, get_activation
from .data import Dataset, load_dataset
from .estimators import GLR, Backprop, GradStats, NonFiniteLossError
from .losses import LOSSES, cross_entropy, get_loss, zero_one
from .layers import (Injection, LocalLosses, NoisyConv2d, NoisyLayer, NoisyLinear, NoisyMLP, NoisySequential, Residual,
                     noisy_layers)
from .model import predict, predict_proba
from .noise import Logistic, make_noise

try:
    from importlib.metadata import PackageNotFoundError, version
    __version__ = version("glrnet")           # one source of truth: pyproject.toml
except PackageNotFoundError:                  # run from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = [
    "ACTIVATIONS", "Backprop", "Dataset", "GLR", "GradStats", "LOSSES", "Logistic", "NoisyConv2d", "NoisyLayer", "NoisyLinear", "NoisyMLP", "NoisySequential",
    "NonFiniteLossError", "Sigmoid", "Injection", "Residual", "LocalLosses", "noisy_layers", "cross_entropy", "get_activation", "get_loss", "load_dataset", "make_noise",
    "predict", "predict_proba", "zero_one",
]
