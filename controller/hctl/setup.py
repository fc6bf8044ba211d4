"""Installing the worker on a machine: the controller's exact version, without breaking its torch.

`ensure_worker(remote, settings)` is what `hctl setup` and `hctl run` call. In order:

1. **Probe** (one command): the machine's Python, its torch / transformers / accelerate versions,
   whether `hctl` is importable there and at which version and build, free disk on the volume and
   the container. When the worker of this exact version is already there and its dependencies
   are new enough, it returns at once (idempotent, about one round trip).
2. **Check** what cannot be fixed (Python older than 3.10, too little disk) and say so clearly.
3. **Wheel**: build a wheel of this very controller — from a developer checkout or an installed
   wheel alike — by assembling the installed `hctl` and `hctl_worker` package files with the
   distribution's metadata (`build_wheel`). Nothing needs to be published first. The wheel
   carries a build id (a hash of its files), so a changed checkout at the same version is
   noticed and reinstalled.
4. **Install** into a virtual environment on the volume (`<volume>/hctl/venv`, created with
   `--system-site-packages`, so the image's CUDA torch is reused, never copied or replaced).
   When the machine's Python is itself a virtual environment (conda, or this test machine),
   the new one layers on top of it with a `.pth` file. Then `pip install` runs with a
   constraint pinning torch to the version already there, so a CUDA build is never swapped for
   another. A torch older than 2.2 (old RunPod images, e.g. torch 2.1) cannot run
   transformers >= 4.55.2 (needed for Qwen3): then torch is upgraded, with a note.
5. **Caches on the volume**: `HF_HOME` and `PIP_CACHE_DIR` point under `<volume>/.cache`, so
   models and wheels survive a pod stop and do not fill the container disk.

Tests use the sshd pod, which is this machine: they set the `worker_python` setting to the
development venv's interpreter, so the probe finds the worker (editable install) and returns at
once; `reinstall=True` exercises the whole install path in a temporary venv layered on the dev
venv, which is never modified (pip refuses to uninstall outside its own environment).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable

from pydantic import BaseModel, Field

import hctl
from hctl.errors import JobError, RemoteError
from hctl.remote.base import Remote
from hctl.settings import Settings
from hctl.wheel import BUILD_ID_FILE, build_id, build_wheel

MessageCallback = Callable[[str], None]
MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 2)
MIN_TRANSFORMERS = (4, 55, 2)
INSTALL_TIMEOUT_S = 1800.0
DEFAULT_MIN_FREE_GB = 5.0  # on the volume: the worker's venv plus a small model's cache
DEFAULT_MIN_CONTAINER_FREE_GB = 0.5


def _ignore(_message: str) -> None:
    pass


class PythonProbe(BaseModel):
    """What one interpreter on the machine has."""

    executable: str
    version: str
    in_venv: bool = False
    site_packages: list[str] = Field(default_factory=list)
    has_pip: bool = False
    hctl: str | None = None
    build_id: str | None = None
    torch: str | None = None
    cuda: str | None = None
    transformers: str | None = None
    accelerate: str | None = None
    worker_script: str | None = None


class MachineProbe(BaseModel):
    """The probe's answer: the base interpreter, the worker venv's (if any), disks."""

    base: PythonProbe | None = None
    venv: PythonProbe | None = None
    volume: str
    volume_exists: bool
    volume_free_gb: float | None = None
    container_free_gb: float | None = None
    home: str = ""


class WorkerInfo(BaseModel):
    """The worker on a machine, ready to run. `str(info)` is the command that runs it."""

    command: str  # e.g. "/workspace/hctl/venv/bin/hctl-worker"
    python: str
    version: str
    torch: str | None = None
    cuda: str | None = None
    transformers: str | None = None
    accelerate: str | None = None
    installed: bool = False  # whether this call installed or upgraded anything
    environment: dict[str, str] = Field(default_factory=dict)  # export these when launching
    volume_free_gb: float | None = None
    container_free_gb: float | None = None

    def __str__(self) -> str:
        return self.command


# --- The probe ------------------------------------------------------------------------------

_PYTHON_PROBE = r"""
import importlib.metadata as m, json, os, site, sys, importlib.util as u
def v(name):
    try:
        return m.version(name)
    except Exception:
        return None
build = None
try:
    build = (m.distribution("hctl").read_text(BUILD_ID_FILE) or "").strip() or None
except Exception:
    pass
cuda = None
if v("torch"):
    # Read torch/version.py instead of importing torch (seconds, and CUDA initialisation).
    try:
        text = m.distribution("torch").locate_file("torch/version.py").read_text()
        for line in text.splitlines():
            if line.startswith("cuda"):
                cuda = line.split("=", 1)[1].strip().strip("'\"")
                cuda = None if cuda in ("None", "") else cuda
    except Exception:
        pass
script = os.path.join(os.path.dirname(sys.executable), "hctl-worker")
print("HCTL_PROBE " + json.dumps({
    "executable": sys.executable, "version": "%d.%d.%d" % sys.version_info[:3],
    "in_venv": sys.prefix != sys.base_prefix, "site_packages": site.getsitepackages(),
    "has_pip": u.find_spec("pip") is not None, "hctl": v("hctl"), "build_id": build,
    "torch": v("torch"), "cuda": cuda, "transformers": v("transformers"),
    "accelerate": v("accelerate"), "worker_script": script if os.path.exists(script) else None,
}))
"""

_DISK_PROBE = r"""
import json, os, shutil, sys
volume = sys.argv[1]
def free(path):
    try:
        return shutil.disk_usage(path).free / 1e9
    except OSError:
        return None
print("HCTL_DISK " + json.dumps({
    "volume": volume, "volume_exists": os.path.isdir(volume) and os.access(volume, os.W_OK),
    "volume_free_gb": free(volume), "container_free_gb": free("/"),
    "home": os.path.expanduser("~"),
}))
"""


def probe_command(base_python: str | None, volume: str) -> str:
    """One shell command that probes the worker venv's Python, the base Python and the disks.

    hctl's folder on the machine is `<volume>/hctl` when the volume exists, else `~/hctl`; the
    worker's venv lives in it.
    """
    code = shlex.quote(_PYTHON_PROBE.replace("BUILD_ID_FILE", repr(BUILD_ID_FILE)))
    disk = shlex.quote(_DISK_PROBE)
    quoted_volume = shlex.quote(volume)
    candidates = shlex.quote(base_python) if base_python else "python3 python"
    return (
        f"if [ -d {quoted_volume} ] && [ -w {quoted_volume} ]; then B={shlex.quote(volume.rstrip('/') + '/hctl')}; "
        'else B="$HOME/hctl"; fi; '
        f'if [ -x "$B/venv/bin/python" ]; then "$B/venv/bin/python" -c {code} '
        "| sed 's/^HCTL_PROBE /HCTL_VENV /'; fi; "
        f'for p in {candidates}; do if command -v "$p" >/dev/null 2>&1; then '
        f'"$p" -c {code}; "$p" -c {disk} {quoted_volume}; break; fi; done'
    )


def parse_probe(output: str, volume: str) -> MachineProbe:
    """Read the probe's `HCTL_*` lines (anything else, e.g. a login banner, is ignored)."""
    base = venv = None
    disks: dict[str, object] = {"volume": volume, "volume_exists": False}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("HCTL_PROBE "):
            base = PythonProbe.model_validate_json(line.split(" ", 1)[1])
        elif line.startswith("HCTL_VENV "):
            venv = PythonProbe.model_validate_json(line.split(" ", 1)[1])
        elif line.startswith("HCTL_DISK "):
            disks = json.loads(line.split(" ", 1)[1])
    return MachineProbe(base=base, venv=venv, **disks)  # type: ignore[arg-type]


def _version_tuple(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    parts = []
    for piece in text.split("+", 1)[0].split("."):
        digits = "".join(character for character in piece if character.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def worker_problems(python: PythonProbe, build_id: str) -> list[str]:
    """Why the worker in `python` cannot be used as it is (empty: it can)."""
    problems = []
    if python.hctl != hctl.__version__:
        problems.append(f"hctl {python.hctl or 'is not installed'} (need {hctl.__version__})")
    elif python.build_id is not None and python.build_id != build_id:
        problems.append("hctl was installed from a different build of the same version")
    if _version_tuple(python.torch) < MIN_TORCH:
        problems.append(f"torch {python.torch or 'missing'} (need >= 2.2)")
    if _version_tuple(python.transformers) < MIN_TRANSFORMERS:
        problems.append(
            f"transformers {python.transformers or 'missing'} (need >= 4.55.2, e.g. for Qwen3)"
        )
    if not python.accelerate:
        problems.append("accelerate missing")
    return problems


# --- Installing -----------------------------------------------------------------------------


def torch_constraints(base: PythonProbe) -> tuple[list[str], str | None]:
    """The pip constraints that keep the machine's torch, and a note when it must change."""
    if base.torch and _version_tuple(base.torch) >= MIN_TORCH:
        # Never let pip swap the image's CUDA build of torch for another one.
        return [f"torch=={base.torch}"], None
    if base.torch:
        return [], (
            f"torch {base.torch} is older than 2.2 and cannot run transformers >= 4.55.2: "
            "upgrading torch (this downloads a few GB)"
        )
    return [], "torch is not installed: installing it (this downloads a few GB)"


def _run(remote: Remote, command: str, what: str, *, on_message: MessageCallback) -> str:
    result = remote.run(command, timeout=INSTALL_TIMEOUT_S)
    if result.exit_code != 0:
        tail = (result.output + result.stderr).strip().splitlines()[-8:]
        raise JobError(
            f"Setup on {remote.description} failed while {what} (exit {result.exit_code}): "
            + " | ".join(tail),
            "Run `hctl setup` again to retry; `hctl status` shows the free disk.",
        )
    return result.output


def _site_layer(parent: PythonProbe) -> str:
    """A .pth line that makes a parent environment's packages (torch...) visible, .pth and all."""
    folders = ", ".join(repr(folder) for folder in parent.site_packages)
    # One line (site.py runs each `import` line of a .pth file on its own), no comprehension
    # (it would not see the name `site` bound by the exec).
    return f"import site; list(map(site.addsitedir, ({folders},)))\n"


def _environment(probe: MachineProbe) -> dict[str, str]:
    if not probe.volume_exists:
        return {}
    volume = probe.volume.rstrip("/")
    return {
        "HF_HOME": f"{volume}/.cache/huggingface",
        "PIP_CACHE_DIR": f"{volume}/.cache/pip",
    }


def _info(python: PythonProbe, probe: MachineProbe, *, installed: bool) -> WorkerInfo:
    if python.worker_script:
        command = shlex.quote(python.worker_script)
    else:
        command = (
            f"{shlex.quote(python.executable)} -c "
            "'import sys; from hctl_worker.cli import main; sys.exit(main())'"
        )
    return WorkerInfo(
        command=command,
        python=python.executable,
        version=python.hctl or "",
        torch=python.torch,
        cuda=python.cuda,
        transformers=python.transformers,
        accelerate=python.accelerate,
        installed=installed,
        environment=_environment(probe),
        volume_free_gb=probe.volume_free_gb,
        container_free_gb=probe.container_free_gb,
    )


def ensure_worker(
    remote: Remote,
    settings: Settings,
    *,
    volume_path: str | None = None,
    python: str | None = None,
    reinstall: bool = False,
    min_free_gb: float = DEFAULT_MIN_FREE_GB,
    on_message: MessageCallback = _ignore,
) -> WorkerInfo:
    """Make sure the worker of this controller's exact version runs on `remote` (see the module).

    `volume_path` defaults to the `volume_path` setting (`/workspace`); where that folder does not
    exist (a plain SSH host), hctl's files go under the user's home instead. `python` defaults to
    the `worker_python` setting, else `python3` (then `python`) on the machine's PATH.
    """
    volume = volume_path or settings.volume_path
    python = python or settings.worker_python
    if python is None and getattr(remote, "kind", None) == "local":
        python = sys.executable  # this machine: the controller's own environment
    identity = build_id()
    probe = parse_probe(
        _run(remote, probe_command(python, volume), "probing", on_message=on_message), volume
    )
    if probe.base is None:
        raise JobError(
            f"No Python found on {remote.description}.",
            "Use an image with Python 3.10+ (RunPod's pytorch images have it), or set "
            "worker_python to its interpreter.",
        )
    base_dir = f"{volume.rstrip('/')}/hctl" if probe.volume_exists else f"{probe.home}/hctl"
    venv_dir = f"{base_dir}/venv"
    assert probe.base is not None
    if not reinstall:
        for candidate in (probe.venv, probe.base):
            if candidate is not None and not worker_problems(candidate, identity):
                return _info(candidate, probe, installed=False)
    base = probe.base
    if _version_tuple(base.version) < MIN_PYTHON:
        raise JobError(
            f"Python {base.version} on {remote.description} is too old: the worker needs 3.10+.",
            "Use a newer image, e.g. runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404.",
        )
    free = probe.volume_free_gb if probe.volume_exists else probe.container_free_gb
    if free is not None and free < min_free_gb:
        where = probe.volume if probe.volume_exists else "the container disk"
        raise JobError(
            f"Only {free:.1f} GB free on {where} of {remote.description}; setup needs "
            f"{min_free_gb:.0f} GB or more (the worker, then the model's weights).",
            "Free space (e.g. `rm -rf /root/.cache/huggingface/hub/models--*`), or create the "
            "pod with a bigger volume (`--volume`).",
        )
    if (
        probe.container_free_gb is not None
        and probe.container_free_gb < DEFAULT_MIN_CONTAINER_FREE_GB
    ):
        on_message(
            f"note: only {probe.container_free_gb:.1f} GB free on the container disk; "
            "hctl keeps its files on the volume."
        )
    reasons = worker_problems(probe.venv or base, identity) or ["reinstall requested"]
    on_message(f"installing the worker on {remote.description}: " + "; ".join(reasons))
    _install(remote, base, probe, base_dir, venv_dir, on_message=on_message)
    after = parse_probe(
        _run(remote, probe_command(python, volume), "checking", on_message=on_message), volume
    )
    if after.venv is None or worker_problems(after.venv, identity):
        problems = worker_problems(after.venv, identity) if after.venv else ["no venv"]
        raise JobError(
            f"The worker on {remote.description} is still not usable: {'; '.join(problems)}.",
            "Run `hctl setup --reinstall`; if that fails, see `hctl exec -- pip list`.",
        )
    return _info(after.venv, after, installed=True)


def _install(
    remote: Remote,
    base: PythonProbe,
    probe: MachineProbe,
    base_dir: str,
    venv_dir: str,
    *,
    on_message: MessageCallback,
) -> None:
    wheel = build_wheel()
    remote_wheel = f"{base_dir}/wheels/{wheel.name}"
    environment = _environment(probe)
    folders = [f"{base_dir}/wheels", *environment.values()]
    _run(
        remote,
        "mkdir -p " + " ".join(shlex.quote(folder) for folder in folders),
        "making folders",
        on_message=on_message,
    )
    on_message(f"uploading {wheel.name}")
    try:
        remote.put(wheel, remote_wheel)
    except RemoteError as error:
        raise JobError(f"Could not upload the worker: {error.message}", error.hint) from None
    venv_python = f"{venv_dir}/bin/python"
    quoted_base = shlex.quote(base.executable)
    make_venv = (
        f"[ -x {shlex.quote(venv_python)} ] || {quoted_base} -m venv --system-site-packages "
        f"--without-pip {shlex.quote(venv_dir)}"
    )
    _run(remote, make_venv, "creating the worker's virtual environment", on_message=on_message)
    if base.in_venv:
        # The machine's Python is itself a virtual environment: layer on top of its packages.
        site_dir = _run(
            remote,
            f"{shlex.quote(venv_python)} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'",
            "locating the venv",
            on_message=on_message,
        ).strip()
        layer = shlex.quote(_site_layer(base))
        _run(
            remote,
            f"printf %s {layer} > {shlex.quote(site_dir + '/hctl-parent-environment.pth')}",
            "linking the parent environment",
            on_message=on_message,
        )
    if not base.has_pip:
        _run(
            remote,
            f"{shlex.quote(venv_python)} -m ensurepip --default-pip",
            "installing pip",
            on_message=on_message,
        )
    constraints, note = torch_constraints(base)
    if note:
        on_message(note)
    constraint_file = f"{base_dir}/constraints.txt"
    text = "".join(f"{line}\n" for line in constraints)
    _run(
        remote,
        f"printf %s {shlex.quote(text)} > {shlex.quote(constraint_file)}",
        "writing constraints",
        on_message=on_message,
    )
    exports = "".join(
        f"export {name}={shlex.quote(value)}; " for name, value in environment.items()
    )
    pip = f"{exports}{shlex.quote(venv_python)} -m pip --disable-pip-version-check --no-input"
    # First the worker itself, into the venv (whatever the parent environment has); then its
    # dependencies, upgrading only what is missing or too old, torch pinned.
    on_message("pip: installing hctl")
    _run(
        remote,
        f"{pip} install -q --no-deps --force-reinstall {shlex.quote(remote_wheel)}",
        "installing hctl",
        on_message=on_message,
    )
    on_message("pip: checking the worker's dependencies (torch pinned)")
    _run(
        remote,
        f"{pip} install -q -c {shlex.quote(constraint_file)} "
        f"{shlex.quote(remote_wheel + '[worker]')}",
        "installing the worker's dependencies",
        on_message=on_message,
    )
