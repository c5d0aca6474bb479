"""Noisy networks: noise densities, activations, losses, perturbations, noisy layers and containers.

Every extension point here is a registry filled by one call, so a new one is one file:
``register_noise`` (:mod:`.noise`), ``ACTIVATIONS`` (:mod:`.activations`), ``LOSSES`` (:mod:`.losses`),
``register_perturbation`` (:mod:`.perturbations`).
"""

from .activations import ACTIVATIONS, Sigmoid, get_activation
from .containers import NoisyMLP, NoisySequential, module_config, module_from_config
from .injection import (Injection, Layout, Probe, check_batch, forward_with_flat_noise, noisy_forward, probe,
                        sample_noise)
from .intercept import intercept, record_preactivations
from .layers import NoisyConv2d, NoisyLayer, NoisyLinear
from .losses import LOSSES, cross_entropy, get_loss, zero_one
from .modules import LocalLosses, MaxPool2d, Residual, noisy_layers
from .noise import Logistic, make_noise, register_noise
from .rescale import rescale_noise_
from .recurrent import Readout, Recurrent, StepLayer, TimeDistributed, TimeLoop
from .spiking import FastSigmoid, Leaky, LeakyIntegrator
from .through_time import TimeInjection
from .perturbations import (PERTURBATIONS, Activity, Channel, Flipout, Perturbation, Weight, get_perturbation,
                            register_perturbation)

__all__ = [
    "ACTIVATIONS", "Activity", "Channel", "Flipout", "Injection", "LOSSES", "Layout", "LocalLosses", "Logistic",
    "MaxPool2d", "NoisyConv2d", "NoisyLayer", "NoisyLinear", "NoisyMLP", "NoisySequential", "PERTURBATIONS",
    "Perturbation", "Probe", "Residual", "Sigmoid", "Weight", "check_batch", "cross_entropy", "forward_with_flat_noise",
    "get_activation", "get_loss", "get_perturbation", "intercept", "make_noise", "module_config",
    "module_from_config", "noisy_forward", "noisy_layers", "probe", "record_preactivations", "register_noise",
    "register_perturbation", "rescale_noise_", "sample_noise", "zero_one",
]
__all__ += [  # through time
    "FastSigmoid", "Leaky", "LeakyIntegrator", "Readout", "Recurrent", "StepLayer", "TimeDistributed",
    "TimeInjection", "TimeLoop",
]
