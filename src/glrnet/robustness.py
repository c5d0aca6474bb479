"""Adaptive attacks on noisy networks: the names users import, gathered from their modules.

* :mod:`glrnet.surrogates`       BPDA surrogates through discontinuous activations
* :mod:`glrnet.moments`          deterministic surrogates of the noisy predictor (mean field, moment propagation)
* :mod:`glrnet.oracles`          LAPClassifier (EOT), the likelihood-ratio input gradient, SPSA
* :mod:`glrnet.attacks`          FGSM, PGD, APGD and the registry of attacks (``ATTACKS``)
* :mod:`glrnet.protocol`         attacks at every ε, worst case, escalation, sanity checks
* :mod:`glrnet.reports`          robustness.md / .csv / checks / figure, spread over seeds
* :mod:`glrnet.attack_settings`  AttackSettings: every setting and its default, in one place
"""

from .attack_settings import CONVERGENCE_TOLERANCE, DEFAULT_EPS, AttackSettings  # noqa: F401
from .attacks import ATTACKS, apgd, attack_model, attack_plan, correct, resolve_attack  # noqa: F401
from .moments import deterministic_surrogates, mean_field_forward, moment_forward, moment_logits  # noqa: F401
from .oracles import LAPClassifier, lr_input_jacobian, spsa_gradient  # noqa: F401
from .protocol import (attack_and_report, escalate, evaluate_robustness, run_protocol,  # noqa: F401
                       sanity_checks)
from .reports import ROBUST_FIELDS, write_reports, write_seed_spread  # noqa: F401
from .surrogates import (_GH, attack_forward, default_surrogate, smoothed_derivative,  # noqa: F401
                         surrogates_for)
