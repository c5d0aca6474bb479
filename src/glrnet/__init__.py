"""glrnet: train noisy neural networks by the generalized likelihood ratio (GLR) method.

Data flows one way: batch → noisy forward (K replications) → per-replication losses
→ estimator → ``param.grad`` → any ``torch.optim`` optimizer.
"""

from .activations import ACTIVATIONS, Sigmoid, get_activation
from .data import Dataset, load_dataset
from .estimators import GLR, Backprop, GradStats, NonFiniteLossError
from .losses import LOSSES, cross_entropy, get_loss, zero_one
from .model import NoisyConv2d, NoisyLayer, NoisyLinear, NoisyMLP, NoisySequential, predict, predict_proba
from .noise import Logistic, make_noise

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "Backprop", "Dataset", "GLR", "GradStats", "LOSSES", "Logistic", "NoisyConv2d", "NoisyLayer", "NoisyLinear", "NoisyMLP", "NoisySequential",
    "NonFiniteLossError", "Sigmoid", "cross_entropy", "get_activation", "get_loss", "load_dataset", "make_noise",
    "predict", "predict_proba", "zero_one",
]
