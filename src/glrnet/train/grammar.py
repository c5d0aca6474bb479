"""The grammar of the training options that are written as text: ``--arch`` (a convolutional stack, or a
network through time), ``--perturb`` (where the noise sits), and the older spellings of the perturbation
that saved runs and older command lines use."""

from __future__ import annotations

from ..nn.activations import get_activation
from ..nn.perturbations import PERTURBATIONS

PERTURB_LAYERS = ("first", "conv", "all")
DEFAULT_WEIGHT_STD = 0.05
ARCHS = {"lenet": "conv:6:5,maxpool:2,conv:16:5,maxpool:2",       # LeNet-style; + hidden and the output layer
         "resnet": "conv:8:3:2:1,res:8:3,res:8:3,res:8:3,avgpool:2"}  # 3 residual blocks of 2 noisy convolutions
LEGACY = ("weight_noise", "weight_noise_std", "flipout", "channelwise", "antithetic")


def parse_arch(arch: str) -> list[tuple[str, list[int]]]:
    """The convolutional part of ``arch`` as [(kind, numbers)], or a ``ValueError`` naming the bad token."""
    out = []
    for token in ARCHS.get(arch, arch).split(","):
        kind, *args = token.strip().split(":")
        try:
            nums = [int(a) for a in args]
        except ValueError:
            nums = []
        if not ((kind == "conv" and 2 <= len(nums) <= 4) or (kind == "res" and len(nums) == 2)
                or (kind in ("maxpool", "avgpool") and len(nums) == 1)) or min(nums, default=0) < 0:
            raise ValueError(f"--arch: cannot read {token!r}; use mlp, {', '.join(ARCHS)}, or comma-separated "
                             "conv:C:K[:stride[:padding]], res:C:K (x + conv(φ(conv(x))), C channels in and out), "
                             "maxpool:K, avgpool:K")
        out.append((kind, nums))
    return out


def parse_time_arch(arch: str) -> list[tuple[str, int, bool, str | None]] | None:
    """A network through time as [(kind, width, recurrent, activation)] — ``lif:H`` (leaky integrate-and-fire
    neurons; activation None), ``lif:H:rec`` (with recurrent weights on the previous spikes), ``rnn:H`` (a
    recurrent tanh layer; ``rnn:H:threshold`` or any activation) — or ``None`` for an arch that is not one."""
    tokens = [t.strip().split(":") for t in arch.split(",")]
    if not any(t[0] in ("lif", "rnn") for t in tokens):
        return None
    out = []
    for t in tokens:
        ok = t[0] in ("lif", "rnn") and 2 <= len(t) <= 3 and t[1].isdigit() and int(t[1]) >= 1
        if ok and t[0] == "lif" and len(t) == 3:
            ok = t[2] == "rec"
        if ok and t[0] == "rnn" and len(t) == 3:
            try:
                get_activation(t[2])
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"--arch: cannot read {':'.join(t)!r} in a network through time; use comma-separated "
                             "lif:H, lif:H:rec (recurrent) or rnn:H[:ACTIVATION], e.g. lif:256 or rnn:128")
        act = None if t[0] == "lif" else (t[2] if len(t) == 3 else "tanh")
        out.append((t[0], int(t[1]), t[0] == "lif" and len(t) == 3 or t[0] == "rnn", act))
    return out


def parse_perturb(text: str) -> tuple[str, str, float]:
    """``perturb`` as (which layers, perturbation name, std): ``activity`` → ("none", "activity", 0.0),
    ``conv=flipout:0.02`` → ("conv", "flipout", 0.02); a ``ValueError`` naming what cannot be read."""
    text = str(text).strip()
    if text == "activity":
        return "none", "activity", 0.0
    which, sep, rest = text.partition("=")
    name, _, std = rest.partition(":")
    weighty = [p for p in PERTURBATIONS if p != "activity"]
    usage = (f"--perturb: cannot read {text!r}; use activity, or WHICH=PERTURBATION[:STD] with WHICH one of "
             f"{', '.join(PERTURB_LAYERS)} and PERTURBATION one of {', '.join(weighty)}, e.g. conv=weight:0.05")
    if not sep or which not in PERTURB_LAYERS or name not in weighty:
        raise ValueError(usage)
    try:
        value = float(std) if std else DEFAULT_WEIGHT_STD
    except ValueError:
        raise ValueError(usage) from None
    if not value > 0:
        raise ValueError(f"--perturb {text}: the noise std must be > 0, got {std}")
    return which, name, value


def legacy_options(d: dict) -> dict:
    """Options of older releases in today's names: ``antithetic`` → ``sampler``; ``weight_noise``
    (``WHICH[=PERTURBATION]``), ``flipout``, ``channelwise`` and ``weight_noise_std`` → ``perturb`` (and
    ``sigma`` for ES and SPSA, whose σ / ε ``weight_noise_std`` also was)."""
    d = dict(d)
    if "antithetic" in d:
        d.setdefault("sampler", "antithetic" if d.pop("antithetic") else "iid")
    if not any(k in d for k in LEGACY):
        return d
    if d.pop("perturb", "activity") != "activity":
        raise ValueError(f"give --perturb alone: {', '.join(k for k in LEGACY if k in d)} name the same choice "
                         "the older way")
    where = d.pop("weight_noise", "none")
    flipout, channelwise = d.pop("flipout", False), d.pop("channelwise", False)
    std = d.pop("weight_noise_std", DEFAULT_WEIGHT_STD)
    which, _, name = str(where).partition("=")
    older = "flipout" if flipout else "channel" if channelwise else None
    if flipout and channelwise:
        raise ValueError("choose one of flipout and channelwise")
    if name and older and name != older:
        raise ValueError(f"weight noise {where!r} names perturbation {name!r}, and "
                         f"--{'flipout' if flipout else 'channelwise'} names {older!r}: give one")
    if which == "none":
        if older:
            raise ValueError(f"{'flipout' if flipout else 'channelwise'} needs GLR with the noise on parameters "
                             "(--perturb first|conv|all=...)")
        if d.get("method") in ("es", "spsa"):
            d.setdefault("sigma", std)
        return d
    d["perturb"] = f"{which}={name or older or 'weight'}:{std:g}"
    return d


def unit_name(arch: str, activation: str) -> str:
    """What a network's hidden units are, for reports: the activation, or ``lif`` (spiking) / ``rnn-ACT`` for a
    network through time, whose units its ``arch`` sets."""
    time = parse_time_arch(arch)
    if time is None:
        return activation
    return "+".join(dict.fromkeys("lif" if kind == "lif" else f"rnn-{act}" for kind, _, _, act in time))
