"""Pod commands: `gpus`, `create-pod`, `list-pods`, `start-pod`, `stop-pod`, `terminate-pod`, `ssh-key`.

Each command parses, calls one function below the CLI (`hctl.pods`, `hctl.sshkeys`, the provider)
and renders the result with rich (the tables and a pod's plan: `pod_display`). A command that
takes a pod defaults to the only running hctl pod.
"""

from __future__ import annotations

from enum import Enum

import typer

from hctl import pods as pod_service
from hctl import sshkeys
from hctl.cli.common import confirm, console
from hctl.cli.pod_display import (
    GPU_COLUMNS,
    POD_COLUMNS,
    describe_plan,
    describe_ready,
    gpu_rows,
    money,
    pod_rows,
)
from hctl.errors import HctlError, PodNotReadyError
from hctl.gpus import check_gpu_filters, select_gpu_types
from hctl.interrupts import interrupts_held
from hctl.output import (
    HctlCommand,
    json_option,
    print_json,
    print_line,
    print_remark,
    print_table,
)
from hctl.providers import make_provider
from hctl.providers.base import Pod, PodLease, PodStatus, Provider
from hctl.services import lease
from hctl.settings import Settings, load_settings


class CloudOption(str, Enum):
    SECURE = "SECURE"
    COMMUNITY = "COMMUNITY"
    ALL = "ALL"


POD_ARGUMENT_HELP = "Pod id or name. Default: your only running hctl pod."
STOP_VERSUS_TERMINATE = (
    "Stopping keeps the volume (its files survive; about $0.20 per GB-month while stopped) and "
    "frees the GPU; the container disk is wiped. Terminating deletes the pod and its volume: "
    "nothing is billed afterwards and nothing can be recovered."
)


def _provider(**overrides: object) -> tuple[Settings, Provider]:
    settings = load_settings(**overrides)
    return settings, make_provider(settings)


def _wait_with_spinner(provider: Provider, pod: Pod, settings: Settings) -> Pod:
    with console.status(f"Waiting for {pod.name} to come up…") as status:

        def on_poll(current: Pod, elapsed: float) -> None:
            status.update(
                f"Waiting for {current.name} to come up ({elapsed:.0f} s, {current.status})…"
            )

        return pod_service.wait_until_ready(
            provider,
            pod.id,
            timeout_s=settings.ready_timeout_s,
            interval_s=settings.ready_poll_interval_s,
            on_poll=on_poll,
        )


def gpus(
    min_vram: int | None = typer.Option(
        None, "--min-vram", help="Only GPUs with at least this many GB."
    ),
    max_price: float | None = typer.Option(
        None, "--max-price", help="Only GPUs at most this many USD per GPU-hour (for --cloud)."
    ),
    in_stock: bool = typer.Option(False, "--in-stock", help="Only GPUs that are free now."),
    cloud: CloudOption = typer.Option(
        CloudOption.ALL, "--cloud", case_sensitive=False, help="Prices of SECURE, COMMUNITY or ALL."
    ),
    spot: bool = typer.Option(False, "--spot", help="Filter and sort by spot price."),
    as_json: bool = json_option(),
) -> None:
    """List RunPod's GPU types with VRAM, prices per hour and stock, cheapest first."""
    check_gpu_filters(min_vram, max_price)
    _, provider = _provider()
    chosen = select_gpu_types(
        provider.gpu_types(),
        min_vram_gb=min_vram,
        max_price=max_price,
        in_stock=in_stock,
        cloud_type=cloud.value,
        spot=spot,
    )
    if as_json:
        print_json([gpu.model_dump() for gpu in chosen])
        return
    if not chosen:
        print_remark("No GPU type matches those filters.")
        return
    print_table(GPU_COLUMNS, gpu_rows(chosen), title="RunPod GPU types (prices per GPU-hour)")


def create_pod(
    gpu: str | None = typer.Argument(
        None, help="GPU type id (see `hctl gpus`). Default: the gpu setting."
    ),
    image: str | None = typer.Option(None, "--image", help="Container image."),
    container_disk: int | None = typer.Option(
        None, "--container-disk", help="Container disk in GB (wiped on stop)."
    ),
    volume: int | None = typer.Option(None, "--volume", help="Volume in GB, kept while stopped."),
    cloud: CloudOption | None = typer.Option(
        None,
        "--cloud",
        case_sensitive=False,
        help="SECURE, COMMUNITY or ALL (default: the setting).",
    ),
    spot: bool = typer.Option(
        False, "--spot", help="A spot (interruptible) pod; needs --bid (RunPod GraphQL only)."
    ),
    bid: float | None = typer.Option(None, "--bid", help="Spot bid in USD per GPU-hour."),
    name: str | None = typer.Option(None, "--name", help="Pod name (hctl- is put in front)."),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the pod; repeatable."),
    ports: str = typer.Option("22/tcp", "--ports", help="Exposed ports, e.g. 22/tcp,8888/http."),
    max_hours: float | None = typer.Option(
        None, "--max-hours", help="The pod is stopped after this many hours."
    ),
    terminate_at_limit: bool = typer.Option(
        False, "--terminate-at-limit", help="At --max-hours terminate (delete) instead of stop."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait until the pod is reachable over SSH."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Create without asking."),
) -> None:
    """Create a pod: shows its price per hour and asks first. It bills until stopped or terminated."""
    # Bad input is refused before anything else happens.
    pod_env, pod_ports = pod_service.parse_env(env), pod_service.parse_ports(ports)
    settings, provider = _provider(image=image, cloud_type=cloud.value if cloud else None)
    plan = pod_service.plan_pod(
        provider, settings, gpu=gpu, container_disk_gb=container_disk, volume_gb=volume,
        spot=spot, bid_per_gpu=bid, name=name, env=pod_env,
        ports=pod_ports, max_hours=max_hours,
        at_limit="terminate" if terminate_at_limit else "stop",
    )  # fmt: skip
    # Only a request that passed every check may make a key (a file in the user's ~/.ssh).
    key, created = sshkeys.ensure_key(settings.ssh_key_path)
    if created:
        print_line(f"Made a new SSH key for hctl: {settings.ssh_key_path}")
    plan.spec.env["PUBLIC_KEY"] = sshkeys.pod_public_keys(provider, key)
    describe_plan(plan, provider)
    confirm(f"Create this pod for about {money(plan.price_per_hour)}/h?", assume_yes=yes)
    pod = pod_service.create_pod(provider, plan)
    print_line(f"Created {pod.name} ({pod.id}) at {money(pod.cost_per_hr)}/h.", style="green")
    mismatch = pod_service.price_note(plan, pod)
    if mismatch:
        print_line(mismatch)
    print_line(
        f"It bills until you stop it (`hctl stop-pod {pod.id}`) or terminate it "
        f"(`hctl terminate-pod {pod.id}`)."
    )
    # A deadline the provider does not keep is kept by the pod, once hctl reaches it.
    if plan.spec.lease is not None and lease.kept_by_pod(provider):
        ready = _arm_lease_or_terminate(provider, pod, plan.spec.lease, settings)
        print_line("Its lease watchdog runs on the pod.")
        describe_ready(ready)
    elif wait:
        describe_ready(_wait_with_spinner(provider, pod, settings))


def _arm_lease_or_terminate(
    provider: Provider, pod: Pod, pod_lease: PodLease, settings: Settings
) -> Pod:
    """Start the pod's own lease watchdog over SSH. A pod hctl cannot reach (or a Ctrl-C while
    waiting) would have no deadline anyone keeps: it was made seconds ago and holds nothing, so
    it is terminated, and the user is told so, or told to do it when that fails too."""
    try:
        ready = _wait_with_spinner(provider, pod, settings)
        lease.arm_over_ssh(ready, provider, pod_lease, settings)
        return ready
    except BaseException as error:
        try:
            with interrupts_held(
                lambda: print_line(
                    f"Still terminating {pod.name} ({pod.id}) so that it does not go on billing; "
                    "Ctrl-C again leaves it as it is."
                )
            ):
                provider.terminate(pod.id)
            released = f"Terminated {pod.name} ({pod.id}): it is not billing."
        except HctlError as failure:
            released = (
                f"Could not terminate {pod.name} ({pod.id}) either ({failure.message}): it may "
                f"still be billing; run `hctl terminate-pod {pod.id}`."
            )
        except KeyboardInterrupt:
            print_line(
                f"Left {pod.name} ({pod.id}) as it was: it may be billing; run "
                f"`hctl terminate-pod {pod.id}`."
            )
            raise
        if isinstance(error, KeyboardInterrupt):
            print_line(released)
            raise
        reason = (
            error.message if isinstance(error, HctlError) else f"{type(error).__name__}: {error}"
        )
        raise PodNotReadyError(
            f"Could not reach {pod.name} to start its --max-hours watchdog ({reason}). {released}",
            "Check the SSH settings (`hctl config`, `hctl ssh-key`) and try again, or create the "
            "pod without --max-hours and stop it yourself.",
        ) from None


def list_pods(as_json: bool = json_option()) -> None:
    """List your pods: status, GPU, price per hour, uptime and SSH endpoints (proxy and direct)."""
    _, provider = _provider()
    pods = provider.list()
    if as_json:
        print_json([pod.model_dump(mode="json") for pod in pods])
        return
    if not pods:
        print_remark("No pods. `hctl create-pod` makes one.")
        return
    print_table(POD_COLUMNS, pod_rows(pods))
    running = sum(pod.cost_per_hr for pod in pods if pod.active)
    print_remark(f"Running pods cost {money(running)}/h in all.")


def start_pod(
    pod: str | None = typer.Argument(
        None, help="Pod id or name. Default: your only stopped hctl pod."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait until the pod is reachable over SSH."),
) -> None:
    """Start a stopped pod again (it bills from now on; its public SSH port changes)."""
    settings, provider = _provider()
    target = pod_service.resolve_pod(provider, pod, status="stopped")
    if target.active:
        print_line(f"{target.name} ({target.id}) is running already.")
        started = target
    else:
        started = provider.start(target.id)
        print_line(
            f"Started {started.name} ({started.id}) at {money(started.cost_per_hr)}/h.",
            style="green",
        )
    if wait:
        describe_ready(_wait_with_spinner(provider, started, settings))


def stop_pod(
    pod: str | None = typer.Argument(None, help=POD_ARGUMENT_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Stop without asking."),
) -> None:
    """Stop a pod: the GPU stops billing, the volume stays (see terminate-pod to delete it)."""
    _, provider = _provider()
    target = pod_service.resolve_pod(provider, pod)
    if target.status == PodStatus.STOPPED:
        print_line(
            f"{target.name} ({target.id}) is stopped already: its GPU is not billing. "
            f"`hctl terminate-pod {target.id}` deletes its volume too."
        )
        return
    print_line(STOP_VERSUS_TERMINATE)
    confirm(f"Stop {target.name} ({target.id})?", assume_yes=yes)
    with pod_service.left_as_it_was_on_failure(target, "stop"):
        stopped = provider.stop(target.id)
    print_line(
        f"Stopped {stopped.name} ({stopped.id}). `hctl start-pod {stopped.id}` starts it again."
    )


def terminate_pod(
    pod: str | None = typer.Argument(None, help=POD_ARGUMENT_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Terminate without asking."),
) -> None:
    """Terminate a pod: delete it and its volume; nothing more is billed."""
    _, provider = _provider()
    target = pod_service.resolve_pod(provider, pod)
    print_line(STOP_VERSUS_TERMINATE)
    confirm(f"Terminate {target.name} ({target.id}) and delete its volume?", assume_yes=yes)
    with pod_service.left_as_it_was_on_failure(target, "terminate"):
        provider.terminate(target.id)
    print_line(f"Terminated {target.name} ({target.id}). Nothing more is billed for it.")


def ssh_key() -> None:
    """Make hctl's SSH key if there is none (ed25519) and register it with your RunPod account."""
    settings, provider = _provider()
    key, created = sshkeys.ensure_key(settings.ssh_key_path)
    made = "Made" if created else "Using"
    print_line(f"{made} the SSH key {settings.ssh_key_path} ({key.split()[0]}).")
    if sshkeys.register_key(provider, key):  # type: ignore[arg-type]
        print_line("Registered it with your RunPod account; pods started from now on accept it.")
    else:
        print_line("Your RunPod account has it already.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
    app.command("gpus", cls=HctlCommand)(gpus)
    app.command("create-pod", cls=HctlCommand)(create_pod)
    app.command("list-pods", cls=HctlCommand)(list_pods)
    app.command("start-pod", cls=HctlCommand)(start_pod)
    app.command("stop-pod", cls=HctlCommand)(stop_pod)
    app.command("terminate-pod", cls=HctlCommand)(terminate_pod)
    app.command("ssh-key", cls=HctlCommand)(ssh_key)
