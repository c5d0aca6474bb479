"""Adaptive attacks on noisy networks: the names users import, gathered from their modules.

They wrap a model from outside (:mod:`glrnet.nn.intercept`): the model knows nothing of attacks. Any
``nn.Module`` whose forward calls glrnet's noisy layers is served: a :class:`~glrnet.NoisySequential`, a plain
``nn.Sequential`` of noisy layers, a module of one's own, a :class:`~glrnet.TimeLoop` through time.

* :mod:`.surrogates`  BPDA surrogates through discontinuous activations
* :mod:`.moments`     deterministic surrogates of the noisy predictor (mean field, moment propagation)
* :mod:`.oracles`     LAPClassifier (EOT), the likelihood-ratio input gradient, SPSA
* :mod:`.attacks`     FGSM, PGD, APGD and the registry of attacks (``ATTACKS``)
* :mod:`.protocol`    attacks at every ε, worst case, escalation, sanity checks
* :mod:`.journal`     every finished attack on disk, so an interrupted run resumes
* :mod:`.reports`     robustness.md / .csv / checks / figure, spread over seeds
* :mod:`.settings`    AttackSettings (the attacks' effort) and ProtocolSettings (ε grid, headline, checks)
"""

from .settings import CONVERGENCE_TOLERANCE, DEFAULT_EPS, AttackSettings, ProtocolSettings
from .attacks import ATTACKS, AttackPlan, apgd, attack_model, attack_plan, correct, plan_attacks, resolve_attack
from .moments import choose_deterministic, deterministic_surrogates, mean_field_forward, moment_forward, moment_logits
from .oracles import LAPClassifier, lr_input_jacobian, spsa_gradient
from .protocol import (ChecksResult, Escalation, ProtocolResult, RobustnessResult, attack_and_report, escalate,
                       evaluate_robustness, sanity_checks)
from .reports import ROBUST_FIELDS, write_reports, write_seed_spread
from .surrogates import (attack_forward, choose_surrogates, default_surrogate, noisy_attack_forward,
                         smoothed_derivative, surrogates_for)

__all__ = [
    "ATTACKS", "AttackPlan", "AttackSettings", "CONVERGENCE_TOLERANCE", "ChecksResult", "DEFAULT_EPS", "Escalation",
    "LAPClassifier", "ProtocolResult", "ProtocolSettings", "ROBUST_FIELDS", "RobustnessResult", "apgd",
    "attack_and_report", "attack_forward", "attack_model", "attack_plan", "choose_deterministic", "choose_surrogates",
    "correct", "default_surrogate", "deterministic_surrogates", "escalate", "evaluate_robustness", "lr_input_jacobian",
    "mean_field_forward", "moment_forward", "moment_logits", "noisy_attack_forward", "plan_attacks", "resolve_attack",
    "sanity_checks", "smoothed_derivative", "spsa_gradient", "surrogates_for", "write_reports", "write_seed_spread",
]
