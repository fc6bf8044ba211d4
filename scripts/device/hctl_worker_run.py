"""`hctl-worker` without an installed entry point: the worker package on PYTHONPATH is enough.

PYTHONPATH=worker:... python3 scripts/device/hctl_worker_run.py run --config C --job-dir J
"""

from __future__ import annotations

from hctl_worker.cli import main

if __name__ == "__main__":
    main()
