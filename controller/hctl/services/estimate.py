"""How long a job will take and what it will cost, before anything is rented.

The throughput model is deliberately simple and written down here so a user can check it:

- **boot**: a new pod pulls its image and starts sshd: `BOOT_SECONDS` (0 for a running pod).
- **download**: the weights reach the machine at `DOWNLOAD_BYTES_PER_SECOND` (0 for `--on local`).
- **load**: Python imports plus reading the weights: `LOAD_FIXED_SECONDS` + bytes / `DISK_BYTES_PER_SECOND`.
- **per trial**: refusal scoring dominates (greedy generation for every harmful prompt), and its
  decoding is memory-bound, so the time scales with the parameter count and inversely with the
  GPU's speed: `TRIAL_FIXED_SECONDS + TRIAL_SECONDS_PER_BILLION × billions / speed ×
  max_response_length / 100`. Calibrated on heretic's published figure (Qwen3-4B on an RTX 3090,
  speed 1.0: about 7.5 s a trial at 100 tokens) and on the tiny CPU fixture.
- **directions and baseline**: residuals of the prompts plus one unmodified evaluation, counted
  as `SETUP_TRIALS` trials' worth of work.
- **export**: writing the chosen model: `EXPORT_FIXED_SECONDS` + bf16 bytes / `DISK_BYTES_PER_SECOND`.

On this machine (`--on local`), the last job measured here replaces the model when there is one
(see `services.calibration`): a CPU is nothing like the GPUs the model was calibrated on.

Speeds are relative to an RTX 3090 (≈ the batched decoding throughput ratio), in `GPU_SPEED`; a GPU not in
the table counts as 1.0. The estimate is a planning figure, not a bill: the live view reports the
money actually spent from the pod's own price per hour.
"""

from __future__ import annotations

from pydantic import BaseModel

from hctl.errors import ConfigError
from hctl.gpus import resolve_gpu
from hctl.providers.base import CloudType, GpuType
from hctl.services.calibration import Measurement
from hctl.services.models import ModelInfo

BOOT_SECONDS = 120.0
DOWNLOAD_BYTES_PER_SECOND = 200e6
UPLOAD_BYTES_PER_SECOND = 10e6  # a local model folder travels from the laptop to the pod
DISK_BYTES_PER_SECOND = 1.0e9
LOAD_FIXED_SECONDS = 20.0
TRIAL_FIXED_SECONDS = 0.3
TRIAL_SECONDS_PER_BILLION = 1.8
SETUP_TRIALS = 4
EXPORT_FIXED_SECONDS = 15.0
DEFAULT_RESPONSE_TOKENS = 100

# GPU memory headroom beyond the bf16 weights: activations, KV cache, CUDA context.
MEMORY_MARGIN_FRACTION = 0.25
MEMORY_MARGIN_GB = 2.0
# Disk on the volume: the downloaded weights, the exported model, and room for caches.
DISK_MARGIN_GB = 5.0

# Relative speed for batched decoding (RTX 3090 = 1.0): mostly memory bandwidth, with a bonus for
# newer compute (the RTX 4090 decodes a batch about 1.5× as fast as a 3090). Matched on the name.
GPU_SPEED: dict[str, float] = {
    "B200": 8.0,
    "H200": 5.0,
    "H100 SXM": 3.5,
    "H100 NVL": 4.0,
    "H100 PCIe": 2.1,
    "H100": 3.0,
    "A100 SXM": 2.1,
    "A100": 2.0,
    "MI300X": 5.5,
    "RTX PRO 6000": 1.9,
    "RTX 5090": 2.3,
    "RTX 4090": 1.5,
    "RTX 6000 Ada": 1.0,
    "RTX 3090": 1.0,
    "L40S": 0.9,
    "L40": 0.9,
    "A40": 0.74,
    "RTX A6000": 0.8,
    "RTX A5000": 0.8,
    "RTX A4500": 0.68,
    "RTX A4000": 0.47,
    "L4": 0.32,
}

# What `hctl estimate` compares when no GPU is named: common single-GPU choices, small to big.
DEFAULT_COMPARISON = [
    "NVIDIA GeForce RTX 3090",
    "NVIDIA GeForce RTX 4090",
    "NVIDIA RTX A6000",
    "NVIDIA L40S",
    "NVIDIA A100 80GB PCIe",
    "NVIDIA H100 80GB HBM3",
]


def gpu_speed(gpu: GpuType | None) -> float:
    """A GPU's relative decoding speed; the longest matching name wins ("H100 SXM" over "H100")."""
    if gpu is None:
        return 1.0
    name = f"{gpu.display_name} {gpu.id}"
    matches = [key for key in GPU_SPEED if key in name]
    if not matches:
        return 1.0
    return GPU_SPEED[max(matches, key=len)]


class Phase(BaseModel):
    name: str
    seconds: float


class Estimate(BaseModel):
    """One GPU's estimate for one job."""

    gpu_id: str
    gpu_name: str
    memory_gb: int | None
    price_per_hour: float | None  # None: not offered (or unknown)
    spot: bool = False
    n_trials: int
    seconds_per_trial: float
    phases: list[Phase]
    fits: bool = True
    fit_problem: str = ""
    basis: str = ""  # where the figures come from when not the throughput model

    @property
    def total_seconds(self) -> float:
        return sum(phase.seconds for phase in self.phases)

    @property
    def total_cost(self) -> float | None:
        if self.price_per_hour is None:
            return None
        return self.price_per_hour * self.total_seconds / 3600

    def seconds_of(self, name: str) -> float:
        return sum(phase.seconds for phase in self.phases if phase.name == name)


def required_gpu_memory_gb(model: ModelInfo) -> float | None:
    """bf16 weights plus the margin the search needs; None when the size is unknown."""
    if model.bf16_bytes is None:
        return None
    weights_gb = model.bf16_bytes / 1e9
    return weights_gb * (1 + MEMORY_MARGIN_FRACTION) + MEMORY_MARGIN_GB


def required_disk_gb(model: ModelInfo) -> float | None:
    """The downloaded weights plus an exported copy plus caches."""
    if model.parameters is None:
        return None
    return (model.download_bytes + (model.bf16_bytes or 0)) / 1e9 + DISK_MARGIN_GB


def trial_seconds(parameters: int, speed: float, response_tokens: int) -> float:
    billions = parameters / 1e9
    scale = response_tokens / DEFAULT_RESPONSE_TOKENS
    return TRIAL_FIXED_SECONDS + TRIAL_SECONDS_PER_BILLION * billions / speed * scale


def estimate_job(
    model: ModelInfo,
    gpu: GpuType | None,
    *,
    n_trials: int,
    cloud_type: CloudType = "ALL",
    spot: bool = False,
    response_tokens: int = DEFAULT_RESPONSE_TOKENS,
    new_pod: bool = True,
    on_this_machine: bool = False,
    volume_gb: float | None = None,
    speed: float | None = None,
    measured: Measurement | None = None,
    gpu_count: int = 1,
    workers: int = 1,
) -> Estimate:
    """The phases of one job on `gpu_count` GPUs of one type (`gpu` None: this machine or an SSH
    host, price 0/unknown), run by `workers` workers sharing the search.

    `measured`: a job this machine ran (for `on_this_machine`), whose figures replace the model's.
    Several workers divide the search's time (each runs its own trials); one worker on several
    GPUs (a model too big for one) holds the model across them and is as fast as on one. The
    price counts every GPU.
    """
    if n_trials < 1:
        raise ConfigError(
            f"The number of trials must be at least 1, not {n_trials}.", "Use --trials 1 or more."
        )
    if model.parameters is None:
        raise ConfigError(
            f"The size of {model.reference} is unknown (the hub cannot be reached from here).",
            "Give it with --params, e.g. --params 4B.",
        )
    speed = speed if speed is not None else gpu_speed(gpu)
    download_bytes = model.download_bytes
    if on_this_machine:
        download_seconds = 0.0
    elif model.is_local:
        download_seconds = download_bytes / UPLOAD_BYTES_PER_SECOND
    else:
        download_seconds = download_bytes / DOWNLOAD_BYTES_PER_SECOND
    per_trial = trial_seconds(model.parameters, speed, response_tokens)
    load_seconds = LOAD_FIXED_SECONDS + download_bytes / DISK_BYTES_PER_SECOND
    setup_seconds = SETUP_TRIALS * per_trial
    export_seconds = EXPORT_FIXED_SECONDS + (model.bf16_bytes or 0) / DISK_BYTES_PER_SECOND
    basis = ""
    if measured is not None and on_this_machine:
        per_trial = measured.trial_for(model.parameters, response_tokens)
        load_seconds = measured.load_for(model.parameters, DISK_BYTES_PER_SECOND)
        setup_seconds = measured.setup_for(model.parameters)
        if measured.export_seconds is not None:
            export_seconds = measured.export_seconds + max(
                0.0, load_seconds - measured.load_seconds
            )
        basis = f"measured on this machine ({measured.model}, {measured.measured_at[:10]})"
    phases = [
        Phase(name="boot", seconds=BOOT_SECONDS if new_pod and not on_this_machine else 0.0),
        Phase(name="download", seconds=download_seconds),
        Phase(name="load", seconds=load_seconds),
        Phase(name="directions", seconds=setup_seconds),
        Phase(name="search", seconds=n_trials * per_trial / max(1, workers)),
        Phase(name="export", seconds=export_seconds),
    ]
    fits, problem = True, ""
    needed_memory = required_gpu_memory_gb(model)
    # Each worker holds the whole model: on one GPU each, or one worker across all of them.
    per_worker_gb = gpu.memory_gb * (gpu_count if workers == 1 else 1) if gpu is not None else 0
    if gpu is not None and needed_memory is not None and per_worker_gb < needed_memory:
        fits = False
        has = f"{gpu_count}x " if gpu_count > 1 and workers == 1 else ""
        problem = (
            f"{model.reference} needs about {needed_memory:.0f} GB of GPU memory "
            f"(bf16 weights + margin); {has}{gpu.display_name} has {per_worker_gb} GB"
        )
    needed_disk = required_disk_gb(model)
    if fits and volume_gb is not None and needed_disk is not None and volume_gb < needed_disk:
        fits = False
        problem = f"{model.reference} needs about {needed_disk:.0f} GB of disk; the volume has {volume_gb:.0f} GB"
    price = gpu.price(cloud_type, spot) if gpu is not None else (0.0 if on_this_machine else None)
    if price is not None:
        price *= gpu_count
    return Estimate(
        gpu_id=gpu.id if gpu is not None else ("local" if on_this_machine else "ssh"),
        gpu_name=(f"{gpu_count}x " if gpu_count > 1 else "") + gpu.display_name
        if gpu is not None
        else ("this machine" if on_this_machine else "SSH host"),
        memory_gb=gpu.memory_gb if gpu is not None else None,
        price_per_hour=price,
        spot=spot,
        n_trials=n_trials,
        seconds_per_trial=per_trial,
        phases=phases,
        fits=fits,
        fit_problem=problem,
        basis=basis,
    )


def compare_gpus(
    model: ModelInfo,
    catalogue: list[GpuType],
    *,
    n_trials: int,
    wanted: list[str] | None = None,
    cloud_type: CloudType = "ALL",
    spot: bool = False,
    response_tokens: int = DEFAULT_RESPONSE_TOKENS,
    volume_gb: float | None = None,
) -> list[Estimate]:
    """Estimates for several GPUs, cheapest total first; those that do not fit go last."""
    if wanted:
        gpus = [resolve_gpu(catalogue, name) for name in wanted]
    else:
        known = {gpu.id: gpu for gpu in catalogue}
        gpus = [known[gpu_id] for gpu_id in DEFAULT_COMPARISON if gpu_id in known]
        if not gpus:
            gpus = catalogue[:6]
    estimates = [
        estimate_job(
            model,
            gpu,
            n_trials=n_trials,
            cloud_type=cloud_type,
            spot=spot,
            response_tokens=response_tokens,
            volume_gb=volume_gb,
        )
        for gpu in gpus
    ]
    return sorted(
        estimates,
        key=lambda estimate: (
            not estimate.fits,
            estimate.total_cost is None,
            estimate.total_cost or 0.0,
        ),
    )


def alternatives(
    model: ModelInfo,
    catalogue: list[GpuType],
    *,
    exclude: str,
    n_trials: int,
    cloud_type: CloudType = "ALL",
    spot: bool = False,
    limit: int = 3,
) -> list[Estimate]:
    """In-stock GPUs that fit the model, cheapest total first: what to offer on a capacity error."""
    candidates = [
        gpu
        for gpu in catalogue
        if gpu.id != exclude
        and (offer := gpu.offer(cloud_type, spot)) is not None
        and offer.stock is not None
    ]
    estimates = [
        estimate_job(model, gpu, n_trials=n_trials, cloud_type=cloud_type, spot=spot)
        for gpu in candidates
    ]
    usable = [estimate for estimate in estimates if estimate.fits]
    return sorted(usable, key=lambda estimate: estimate.total_cost or 0.0)[:limit]


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, remainder = divmod(seconds, 3600)
    minutes, secs = divmod(remainder, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_money(amount: float | None) -> str:
    if amount is None:
        return "—"
    if amount < 0.01 and amount > 0:
        return "<$0.01"
    return f"${amount:.2f}"
