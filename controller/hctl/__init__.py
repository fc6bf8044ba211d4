"""hctl: rent a GPU, abliterate a model there, watch it live, stop paying when it is done.

This package is the laptop side. It never imports torch, so `pip install hctl` stays light. Its
version is the worker's (`hctl_worker.__version__`, torch-free): both halves are one release.
"""

from hctl_worker import __version__

__all__ = ["__version__"]
