"""glrnet: train noisy neural networks by the generalized likelihood ratio (GLR) method.

Data flows one way: batch → noisy forward (K replications) → per-replication losses → control
variate → estimator → ``param.grad`` → any ``torch.optim`` optimizer.

* :mod:`glrnet.nn`          noise, activations, losses, perturbations, noisy layers, containers
* :mod:`glrnet.estimators`  GLR (reference and fast path), samplers, control variates, ES / SPSA /
                            forward gradients / back-propagation, torch.distributed
* :mod:`glrnet.predict`     OT, LAP and majority-vote prediction
* :mod:`glrnet.robustness`  adaptive attacks that wrap a model from outside
* :mod:`glrnet.certify`     certified L2 radii
"""

from .data import Dataset, load_dataset
from .estimators import ES, GLR, SPSA, Backprop, ForwardGradient, GradStats, NonFiniteLossError
from .nn import (ACTIVATIONS, LOSSES, Activity, Channel, Flipout, Injection, LocalLosses, Logistic, NoisyConv2d,
                 NoisyLayer, NoisyLinear, NoisyMLP, NoisySequential, Perturbation, Residual, Sigmoid, Weight,
                 cross_entropy, get_activation, get_loss, make_noise, noisy_layers, zero_one)
from .nn import Leaky, LeakyIntegrator, Readout, Recurrent, TimeDistributed, TimeLoop
from .predict import predict, predict_proba

try:
    from importlib.metadata import PackageNotFoundError, version
    __version__ = version("glrnet")           # one source of truth: pyproject.toml
except PackageNotFoundError:                  # run from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = [
    "ACTIVATIONS", "Activity", "Backprop", "Channel", "Dataset", "ES", "Flipout", "ForwardGradient", "GLR", "GradStats",
    "Injection", "LOSSES", "LocalLosses", "Logistic", "NoisyConv2d", "NoisyLayer", "NoisyLinear", "NoisyMLP",
    "NoisySequential", "NonFiniteLossError", "Perturbation", "Residual", "SPSA", "Sigmoid", "Weight", "cross_entropy",
    "get_activation", "get_loss", "load_dataset", "make_noise", "noisy_layers", "predict", "predict_proba", "zero_one",
]
__all__ += [  # through time
    "Leaky", "LeakyIntegrator", "Readout", "Recurrent", "TimeDistributed", "TimeLoop",
]
