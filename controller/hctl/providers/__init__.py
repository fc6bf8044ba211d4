"""Where machines come from. `base` holds the boundary; one sub-package per provider."""
