"""Adaptive attacks on noisy networks: the names users import, gathered from their modules.

They wrap a model from outside (:mod:`glrnet.nn.intercept`): the model knows nothing of attacks.

* :mod:`.surrogates`  BPDA surrogates through discontinuous activations
* :mod:`.moments`     deterministic surrogates of the noisy predictor (mean field, moment propagation)
* :mod:`.oracles`     LAPClassifier (EOT), the likelihood-ratio input gradient, SPSA
* :mod:`.attacks`     FGSM, PGD, APGD and the registry of attacks (``ATTACKS``)
* :mod:`.protocol`    attacks at every ε, worst case, escalation, sanity checks
* :mod:`.journal`     every finished attack on disk, so an interrupted run resumes
* :mod:`.reports`     robustness.md / .csv / checks / figure, spread over seeds
* :mod:`.settings`    AttackSettings: every setting and its default, in one place
"""

from .settings import CONVERGENCE_TOLERANCE, DEFAULT_EPS, AttackSettings  # noqa: F401
from .attacks import ATTACKS, apgd, attack_model, attack_plan, correct, resolve_attack  # noqa: F401
from .moments import deterministic_surrogates, mean_field_forward, moment_forward, moment_logits  # noqa: F401
from .oracles import LAPClassifier, lr_input_jacobian, spsa_gradient  # noqa: F401
from .protocol import (attack_and_report, escalate, evaluate_robustness, run_protocol,  # noqa: F401
                       sanity_checks)
from .reports import ROBUST_FIELDS, write_reports, write_seed_spread  # noqa: F401
from .surrogates import attack_forward, default_surrogate, smoothed_derivative, surrogates_for  # noqa: F401
