"""hctl: rent a GPU, abliterate a model there, watch it live, stop paying when it is done.

This package is the laptop side. It never imports torch, so `pip install hctl` stays light.
"""

__version__ = "0.1.0"
