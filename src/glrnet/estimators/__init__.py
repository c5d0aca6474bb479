"""Gradient producers. Each has ``backward(model, x, y)``, fills ``.grad`` of the trainable parameters
of the noisy layers, and leaves the step to any ``torch.optim`` optimizer.

* :mod:`.reference`        the GLR estimate by its definition (a few lines; the tests' reference)
* :mod:`.glr`              :class:`GLR`, the fast path, tested equal to the reference
* :mod:`.samplers`         how the noise is drawn (i.i.d., antithetic, QMC): ``register_sampler``
* :mod:`.control_variates` loss weights w = L − b: ``register_control_variate``
* :mod:`.alternatives`     ES, SPSA, forward gradients; :mod:`.backprop` back-propagation
* :mod:`.distributed`      the same estimate over ``torch.distributed`` ranks
"""

from .alternatives import ES, SPSA, CenteredRanks, ForwardGradient
from .backprop import Backprop
from .control_variates import CONTROL_VARIATES, ControlVariate, get_control_variate, register_control_variate
from .glr import GLR, GradStats, NonFiniteLossError, fill_grads, glr_parameters
from .reference import reference_estimate
from .samplers import SAMPLERS, Sampler, get_sampler, register_sampler

__all__ = [
    "Backprop", "CONTROL_VARIATES", "CenteredRanks", "ControlVariate", "ES", "ForwardGradient", "GLR", "GradStats",
    "NonFiniteLossError", "SAMPLERS", "SPSA", "Sampler", "fill_grads", "get_control_variate", "get_sampler",
    "glr_parameters", "reference_estimate", "register_control_variate", "register_sampler",
]
