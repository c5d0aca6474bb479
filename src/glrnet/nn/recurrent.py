"""Layers through time: noisy recurrent layers, and the containers that run layers over a sequence.

Sequences are batch first, (B, T, *features), as every glrnet model's input: the first axis is the batch
that labels index and that a noisy pass grows to K·B replications (snntorch's (T, B, ...) is
``x.transpose(0, 1)``).

A layer through time (:class:`StepLayer`) is a noisy linear layer applied once per time step, to its
input at that step and, if ``recurrent``, to its own previous output:

    v_t = W [x_t; o_{t−1}] + b (+ its noise, inside a noisy pass),    o_t = its neuron's output.

It *is* a :class:`~glrnet.NoisyLinear` over the concatenation [x_t; o_{t−1}] (weight (out, in + out):
``input_weight`` and ``recurrent_weight`` are views of it), so every perturbation (activity, weight,
flipout, channel), the estimator's closed forms and the layer's own saved format apply to it unchanged.
Inside a noisy pass it is applied T times; each application draws fresh activity noise (a weight
perturbation is one draw held over the sequence), and its GLR term is the sum over steps of the
one-step term against the input that step saw (:mod:`glrnet.nn.through_time`; DESIGN §10).

Two ways to run layers over a sequence, with the same result:

* layer by layer, in a :class:`~glrnet.NoisySequential`: each layer's ``forward`` takes the whole
  sequence (B, T, in) → (B, T, out); plain per-step modules go in a :class:`TimeDistributed`, and a
  :class:`Readout` reduces (B, T, C) to the model's output (B, C). Activations of every step are kept
  between layers (memory linear in T, as back-propagation through time needs anyway);
* step by step, in a :class:`TimeLoop`: at each step every module sees that step only, the layers'
  states are carried from step to step, and the readout is accumulated — memory independent of T.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from .activations import ACTIVATIONS, SMOOTH, ActivationLike
from .containers import NoisySequential, register_saved_type
from .layers import NoisyLayer, NoisyLinear, PerturbationLike, act_name
from .modules import noisy_layers

ACTIVATIONS.setdefault("tanh", torch.tanh)      # the usual recurrent unit; smooth: back-propagation applies
SMOOTH.add("tanh")

READOUTS = ("sum", "mean", "last")


def match_rows(a: Tensor, rows: int) -> Tensor:
    """``a`` with ``rows`` rows: a (B, ...) tensor shared by the replications is repeated (replication-major)
    once a noisy pass has grown the batch to k·B rows."""
    if a.shape[0] == rows:
        return a
    if rows % a.shape[0]:
        raise RuntimeError(f"cannot match {a.shape[0]} rows to {rows}")
    return a.repeat(rows // a.shape[0], *[1] * (a.dim() - 1))


def reduce_time(total: Tensor | None, out: Tensor, readout: str, steps: int) -> Tensor:
    """The readout after one more step: the running sum (``sum``, ``mean``: divided at the end) or the
    latest output (``last``)."""
    if readout == "last" or total is None:
        return out
    rows = max(total.shape[0], out.shape[0])
    return match_rows(total, rows) + match_rows(out, rows)


class StepLayer(NoisyLinear):
    """Base of the layers through time: a :class:`~glrnet.NoisyLinear` over [x_t; o_{t−1}] (module
    docstring). Subclasses define :meth:`step`; ``forward`` runs it over a sequence.

    Args:
        in_features: features of x_t.
        out_features: units.
        recurrent: the previous output o_{t−1} is an input too (``recurrent_weight``, zero-initialised state).
        bias, activation, noise, perturbation, site, device, dtype: as for :class:`~glrnet.NoisyLinear`.
    """

    def __init__(self, in_features: int, out_features: int, recurrent: bool = False, bias: bool = True,
                 activation: ActivationLike = None, noise: Distribution | None = None,
                 perturbation: PerturbationLike = None, site: str | None = None, device=None, dtype=None):
        NoisyLinear.__init__(self, in_features + (out_features if recurrent else 0), out_features, bias, activation,
                             noise, perturbation, site, device, dtype)
        self.input_features, self.recurrent = in_features, recurrent

    @property
    def input_weight(self) -> Tensor:
        """W_in (out, in): a view of ``weight``."""
        return self.weight[:, :self.input_features]

    @property
    def recurrent_weight(self) -> Tensor | None:
        """W_rec (out, out): a view of ``weight`` (None without recurrence)."""
        return self.weight[:, self.input_features:] if self.recurrent else None

    def step_input(self, x: Tensor, previous: Tensor | None) -> Tensor:
        """[x_t; o_{t−1}] (o_0 = 0), or x_t without recurrence; rows matched (a noisy pass grows them)."""
        if not self.recurrent:
            return x
        if previous is None:
            previous = x.new_zeros(x.shape[0], self.out_features)
        rows = max(x.shape[0], previous.shape[0])
        return torch.cat([match_rows(x, rows), match_rows(previous, rows)], -1)

    def preactivation(self, h: Tensor) -> Tensor:
        """φ(W h + b): through the noisy pass in progress if any (its noise and perturbation), else noise-free."""
        return NoisyLayer.forward(self, h)

    def step(self, x: Tensor, state):
        """(o_t, state_t) from x_t (B or k·B rows, ``in_features``) and the previous state (None at t = 1)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The sequence of outputs (B, T, out) for inputs (B, T, in), from the zero state."""
        if x.dim() != 3 or x.shape[-1] != self.input_features:
            raise ValueError(f"{type(self).__name__} takes sequences (batch, steps, {self.input_features}), "
                             f"got {tuple(x.shape)}")
        state, outs = None, []
        for t in range(x.shape[1]):
            o, state = self.step(x[:, t], state)
            outs.append(o)
        rows = outs[-1].shape[0]
        return torch.stack([match_rows(o, rows) for o in outs], 1)

    def extra_repr(self) -> str:
        return (f"in_features={self.input_features}, out_features={self.out_features}, recurrent={self.recurrent}, "
                f"bias={self.bias is not None}, noise={self.noise}"
                + ("" if self.perturbation.name == "activity" else f", perturbation={self.perturbation.name}"))

    def config(self) -> dict:
        return {"type": type(self).__name__, "in_features": self.input_features, "out_features": self.out_features,
                "recurrent": self.recurrent, "bias": self.bias is not None, **self._perturbation_config()}


class Recurrent(StepLayer):
    """A noisy recurrent (Elman) layer: h_t = φ(W_in x_t + W_rec h_{t−1} + b + r_t), h_0 = 0, r_t ~ f i.i.d. per
    unit and step inside a noisy pass. ``activation``: any glrnet activation (default ``tanh``; ``threshold``
    gives binary units GLR trains and back-propagation cannot). ``recurrent=False``: a feed-forward layer
    applied per step."""

    def __init__(self, in_features: int, out_features: int, activation: ActivationLike = "tanh",
                 recurrent: bool = True, bias: bool = True, noise: Distribution | None = None,
                 perturbation: PerturbationLike = None, site: str | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, recurrent, bias, activation, noise, perturbation, site, device,
                         dtype)

    def step(self, x, state):
        h = self.preactivation(self.step_input(x, state))
        return h, h

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={act_name(self.activation)}"

    def config(self) -> dict:
        return {**super().config(), "activation": act_name(self.activation)}


class TimeDistributed(nn.Module):
    """A plain (noise-free) module applied to every step of a sequence: (B, T, ...) → (B, T, ...), the steps
    folded into the batch. A noisy layer is applied per step by a :class:`TimeLoop` (or is a layer through
    time itself): inside a noisy pass its rows must be the batch."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if noisy_layers(module):
            raise ValueError("TimeDistributed takes plain modules; put noisy layers in a TimeLoop, which applies "
                             "them step by step")
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        y = self.module(x.flatten(0, 1))
        return y.unflatten(0, x.shape[:2])


class Readout(nn.Module):
    """(B, T, C) → (B, C): the ``sum`` over steps (a spike count), the ``mean``, or the ``last`` step (a
    leaky integrator's final membrane)."""

    def __init__(self, readout: str = "sum"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; valid: {', '.join(READOUTS)}")
        self.readout = readout

    def forward(self, x: Tensor) -> Tensor:
        if self.readout == "last":
            return x[:, -1]
        return x.sum(1) if self.readout == "sum" else x.mean(1)

    def extra_repr(self) -> str:
        return repr(self.readout)


class TimeLoop(NoisySequential):
    """Modules applied step by step over a sequence (B, T, *step_shape) → (B, C): at step t the first module
    takes x[:, t], each module's output feeds the next, a layer through time (:class:`StepLayer`) carries
    its state to step t + 1, and the last module's outputs are reduced over the steps by ``readout``
    (``sum``: a spike count; ``mean``; ``last``: e.g. a :class:`~glrnet.nn.spiking.LeakyIntegrator`'s final
    membrane). Only one step's activations exist at a time, so memory does not grow with T — in a noisy
    pass too, where the estimator's memory then does not either (:mod:`glrnet.estimators.through_time`).

    Args:
        *modules: layers through time, noisy layers (applied per step, fresh noise each step) and plain
            modules (applied per step).
        readout: ``sum``, ``mean`` or ``last``.
        noise, input_shape: as for :class:`~glrnet.NoisySequential` (``input_shape`` = (T, *step_shape)).
    """

    def __init__(self, *modules: nn.Module, readout: str = "sum", noise: Distribution | None = None,
                 input_shape: Sequence[int] | None = None):
        super().__init__(*modules, noise=noise, input_shape=input_shape)
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; valid: {', '.join(READOUTS)}")
        self.readout = readout

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            raise TypeError("a TimeLoop is not sliced: build one from the modules you need")
        return super().__getitem__(idx)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is not None:
            raise ValueError("a TimeLoop draws its noise step by step inside a noisy pass (glrnet.GLR, predict); "
                             "it takes no flat noise tensor")
        x = self.bind(x)
        if x.dim() < 3:
            raise ValueError(f"a TimeLoop takes sequences (batch, steps, ...), got {tuple(x.shape)}")
        states: dict[int, object] = {}
        total = None
        for t in range(x.shape[1]):
            h = x[:, t]
            for j, m in enumerate(self):
                if isinstance(m, StepLayer):
                    h, states[j] = m.step(h, states.get(j))
                else:
                    h = m(h)
            total = reduce_time(total, h, self.readout, t)
        return total / x.shape[1] if self.readout == "mean" else total

    def extra_repr(self) -> str:
        return f"readout={self.readout!r}"

    def config(self) -> dict:
        return {"type": "TimeLoop", **super().config(), "readout": self.readout}


register_saved_type("Recurrent", Recurrent)
register_saved_type("TimeLoop", TimeLoop)
