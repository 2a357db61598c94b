"""Lightning glue: training modules and loss managers for multitask NequIP training."""

from .coefficients import update_coeffs

__all__ = ["update_coeffs"]

# --- callbacks/weighting exports (owned by the loss-coefficient work; keep this block) ---
# --- end callbacks/weighting exports ---
