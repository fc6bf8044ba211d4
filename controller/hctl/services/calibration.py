"""This machine's measured speed, so a `--on local` estimate comes from measurements, not guesses.

The throughput model in `services.estimate` is calibrated on GPUs; a laptop's CPU, or a model so
small that fixed costs dominate, is far from it. So when a job on this machine ends, the phase
durations its worker reported are kept in `calibration.json` in hctl's data folder:

- **load**: the `loading` stage (imports and reading the weights);
- **setup**: prompts, batch size, directions and baseline;
- **trial**: the median trial;
- **export**: the export's own `loading` and `export` stages, when there was one.

The next local estimate uses them: for the same model the measured figures as they are (a trial
scaled by the reply length), for another one the size-dependent phases scaled by its parameter
count (never below what was measured, since the fixed costs remain), plus reading the extra
weights.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError

from hctl_worker.events import StageEvent, TrialEvent

SETUP_STAGES = ("prompts", "batch_size", "directions", "baseline")
BYTES_PER_PARAMETER = 2  # the worker holds weights in 16 bits


class Measurement(BaseModel):
    """What one finished job on this machine took, phase by phase."""

    model: str
    parameters: int
    response_tokens: int
    load_seconds: float
    setup_seconds: float
    trial_seconds: float
    export_seconds: float | None = None
    measured_at: str

    def trial_for(self, parameters: int, response_tokens: int) -> float:
        scale = max(1.0, parameters / self.parameters) * response_tokens / self.response_tokens
        return self.trial_seconds * scale

    def setup_for(self, parameters: int) -> float:
        return self.setup_seconds * max(1.0, parameters / self.parameters)

    def load_for(self, parameters: int, disk_bytes_per_second: float) -> float:
        extra = max(0, parameters - self.parameters) * BYTES_PER_PARAMETER
        return self.load_seconds + extra / disk_bytes_per_second


def measure(
    events: list, *, model: str, parameters: int, response_tokens: int
) -> Measurement | None:
    """The measurement a job's events give; None when the search never timed a trial."""
    trials = [event.seconds for event in events if isinstance(event, TrialEvent)]
    ended = [event for event in events if isinstance(event, StageEvent) and event.state == "end"]
    loads = [event.seconds or 0.0 for event in ended if event.stage == "loading"]
    if not trials or not loads:
        return None
    exports = [event.seconds or 0.0 for event in ended if event.stage == "export"]
    return Measurement(
        model=model,
        parameters=parameters,
        response_tokens=response_tokens,
        load_seconds=loads[0],
        setup_seconds=sum(event.seconds or 0.0 for event in ended if event.stage in SETUP_STAGES),
        trial_seconds=statistics.median(trials),
        export_seconds=(exports[-1] + loads[-1]) if exports and len(loads) > 1 else None,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def save(path: Path, measurement: Measurement) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(measurement.model_dump_json(indent=2), encoding="utf-8")
    temporary.replace(path)


def load(path: Path) -> Measurement | None:
    """The last measurement; None when there is none (or it cannot be read: it is only a hint)."""
    try:
        return Measurement.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError):
        return None
