"""Moved: the training-time adversaries are `fairbench.adversaries` (method building blocks; `attacks/` holds
the evaluation attacks). This name keeps plugins written against it working and says where to go."""
from __future__ import annotations

import warnings

from fairbench.adversaries import *  # noqa: F401,F403

warnings.warn("fairbench.attacks.training moved to fairbench.adversaries; import from there", DeprecationWarning,
              stacklevel=2)
