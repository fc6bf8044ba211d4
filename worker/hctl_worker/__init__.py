"""hctl_worker: the GPU side of hctl (abliteration with an Optuna search).

Only `hctl_worker.events` may be imported without torch; everything else needs the `worker` extra.
"""

from hctl import __version__

__all__ = ["__version__"]
