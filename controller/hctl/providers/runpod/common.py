"""What RunPod's two APIs share: the create that is never sent twice, the capacity error made
useful, and the command a pod runs to stop itself.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable

from hctl.errors import CapacityError, ProviderError, UnknownGpuError
from hctl.providers.base import GpuType, Pod, PodSpec
from hctl.providers.runpod.http import OutcomeUnknownError, RateLimitedError, Sleep

NOT_ENOUGH_GPUS_ON_HOST = "not enough free gpus on the host machine"
RETIREMENT = "early 2027"  # when RunPod retires its GraphQL API (runpod-api.md, status)
MAX_LOOKUP_INTERVAL_S = 5.0


def create_once(
    send: Callable[[], Pod],
    find: Callable[[str], Pod | None],
    spec: PodSpec,
    *,
    retries: int,
    grace_s: float,
    backoff_s: float,
    sleep: Sleep,
) -> Pod:
    """Create a pod; a create that may have been applied is never sent a second time blindly.

    When a create fails without saying whether RunPod acted on it (no answer in time, a dropped
    connection, a 5xx), RunPod may still be placing the pod: look for it by its name (hctl's
    names are unique) for `grace_s` seconds before anything else, and send the create again only
    when it never appears. A 429 or a connection never made were refused before anything
    happened; the client has already sent those again as long as it should.
    """
    attempt = 0
    while True:
        try:
            return send()
        except ProviderError as error:
            if not isinstance(error, OutcomeUnknownError) or isinstance(error, RateLimitedError):
                raise
            existing = _wait_for_pod(find, spec.name, grace_s, sleep)
            if existing is not None:
                return existing
            if attempt >= retries:
                raise
            sleep(backoff_s * 2**attempt)
            attempt += 1


def _wait_for_pod(
    find: Callable[[str], Pod | None], name: str, grace_s: float, sleep: Sleep
) -> Pod | None:
    """The pod named `name`, looked for now and then for `grace_s` seconds; None if it never
    shows up."""
    interval = min(MAX_LOOKUP_INTERVAL_S, max(grace_s / 15, 0.1))
    lookups = 1 + math.ceil(grace_s / interval) if grace_s > 0 else 1
    for lookup in range(lookups):
        if lookup:
            sleep(interval)
        try:
            found = find(name)
        except ProviderError:
            found = None
        if found is not None:
            return found
    return None


def capacity_error(catalogue: list[GpuType] | None, spec: PodSpec) -> ProviderError:
    """RunPod's capacity message, made useful: what is in stock instead, at what price.

    RunPod gives the same message for a GPU id it does not know, so that is checked first.
    """
    if catalogue is None:
        return CapacityError(f"No {spec.gpu_type_id} is free on RunPod right now.")
    gpu = next((item for item in catalogue if item.id == spec.gpu_type_id), None)
    if gpu is None:
        from hctl.gpus import suggest_gpu_types

        close = suggest_gpu_types(catalogue, spec.gpu_type_id)
        hint = (
            "Did you mean " + " or ".join(f'"{item.id}"' for item in close) + "?"
            if close
            else "Run `hctl gpus` to list the GPU types and their ids."
        )
        return UnknownGpuError(f"RunPod has no GPU type with the id {spec.gpu_type_id!r}.", hint)
    cloud = spec.cloud_type
    in_stock = sorted(
        (
            other
            for other in catalogue
            if other.id != gpu.id
            and (offer := other.offer(cloud)) is not None
            and offer.stock is not None
        ),
        key=lambda other: other.price(cloud) or 0.0,
    )
    where = {"SECURE": " in secure cloud", "COMMUNITY": " in community cloud"}.get(cloud, "")
    other_cloud = {"SECURE": "COMMUNITY", "COMMUNITY": "SECURE"}.get(cloud)
    there = gpu.offer(other_cloud) if other_cloud else None
    switch = (
        f", or `--cloud {other_cloud}` (${there.price_per_gpu_hour:.2f}/h there)"
        if there is not None and there.stock is not None
        else ""
    )
    if not in_stock:
        return CapacityError(
            f"No {gpu.display_name} is free on RunPod{where} right now, and no other GPU "
            "type is in stock either.",
            f"Try again in a few minutes{switch}.",
        )
    offers = ", ".join(
        f"{other.display_name} {other.memory_gb} GB ${other.price(cloud):.2f}/h"
        for other in in_stock[:5]
    )
    return CapacityError(
        f"No {gpu.display_name} is free on RunPod{where} right now. In stock: {offers}.",
        f'Create one of those instead, e.g. `hctl create-pod "{in_stock[0].id}"`{switch}.',
    )


def host_has_no_gpu(pod_id: str) -> CapacityError:
    return CapacityError(
        f"Pod {pod_id} cannot start: its machine has no free GPU right now.",
        "A stopped pod is tied to its machine. Try again later, or terminate it and "
        "create a new pod (the volume's contents are lost).",
    )


# Run on the pod by python3 (every pod image has one; nothing else is needed). The pod's own
# identity and credentials come from the environment RunPod gives every pod.
_SELF_STOP_PROGRAM = """\
import json, os, sys, urllib.request
pod, key = os.environ.get("RUNPOD_POD_ID"), os.environ.get("RUNPOD_API_KEY")
if not pod or not key:
    sys.exit("hctl: RUNPOD_POD_ID or RUNPOD_API_KEY is not set; this is not a RunPod pod")
url, method, body = {url!r}.replace("{{pod}}", pod), {method!r}, {body!r}.replace("{{pod}}", pod)
request = urllib.request.Request(url, data=body.encode() if body else None, method=method, headers={{
    "Authorization": "Bearer " + key, "Content-Type": "application/json",
    "User-Agent": "hctl-pod"}})
with urllib.request.urlopen(request, timeout=60) as answer:
    text = answer.read(2000).decode("utf-8", "replace")
print("hctl: the API answered HTTP", answer.status, text[:300])
try:
    refused = (json.loads(text) or {{}}).get("errors") if text.startswith("{{") else None
except ValueError:
    refused = None
if refused:  # GraphQL refuses with HTTP 200 and an errors list
    sys.exit("hctl: refused: " + str(refused)[:300])
"""


def self_stop_command(url: str, method: str, body: dict | None) -> str:
    """A shell command that sends one request to RunPod's API as the pod itself.

    `{pod}` in `url` or in `body`'s values is replaced by the pod's id on the pod.
    """
    program = _SELF_STOP_PROGRAM.format(
        url=url, method=method, body=json.dumps(body) if body is not None else ""
    )
    return f"python3 -c {shlex.quote(program)}"
