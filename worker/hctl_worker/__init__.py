"""hctl_worker: the GPU side of hctl (abliteration with an Optuna search).

The controller (`hctl`, the laptop side) imports this package's torch-free contract modules and
nothing else: this file (the one version of both halves), `errors` (the base error of both),
`events` (the event protocol and the job directory's file names) and `trials` (the trial record
and the Pareto front). Everything else needs the `worker` extra. Nothing here imports `hctl`:
the dependency runs one way, controller to worker.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
