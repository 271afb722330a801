"""liftplace: LIFT and PLACE knowledge distillation for diffusion models.

>>> loss = liftplace.lift_place_loss(student_out, teacher_out.detach())
"""

from ._version import __version__
from ._ops import backend_info, get_backend, set_backend
from .loss import LiftPlaceLoss, LiftPlaceOptions, fit_groups, lift_place_loss
from .timesteps import bucket_stats

__all__ = [
    "LiftPlaceLoss",
    "LiftPlaceOptions",
    "backend_info",
    "bucket_stats",
    "fit_groups",
    "get_backend",
    "lift_place_loss",
    "set_backend",
]

