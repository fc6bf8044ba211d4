"""RunPod's REST API v2 (`https://api.runpod.io/v2/...`): JSON in, JSON or an error out.

RunPod answers failures with RFC 9457 problem documents (`{"title", "status", "detail",
"errors"}`); they become hctl errors here, with a hint that says what to do (see RunPod's
OpenAPI document, `runpod-rest-v2-openapi.json`: which statuses mean what on `createPod`).
Retries are `http.ApiHttp`'s.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from hctl.errors import ApiError, CapacityError, PodNotFoundError, ProviderError
from hctl.providers.runpod.http import (
    ApiHttp,
    RateLimitedError,
    RetryPolicy,
    rejected_key,
    retry_after,
    server_error,
)

CAPACITY_TEXTS = ("no longer any instances available", "could not be placed", "no capacity")


class RestClient:
    """Sends REST v2 requests to RunPod and returns the decoded answer (None for 204)."""

    def __init__(self, http: ApiHttp) -> None:
        self.http = http

    def close(self) -> None:
        self.http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        retry: RetryPolicy,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        pod_id: str | None = None,
    ) -> Any:
        """One request; `pod_id` names the pod the path is about (its 404 means "no such
        pod"; elsewhere a 404 means the address is not RunPod's API)."""
        return self.http.call(
            method,
            path,
            lambda response: _json_or_raise(response, pod_id),
            retry=retry,
            json=json,
            params=params,
            timeout_s=timeout_s,
        )


def _problem(response: httpx.Response) -> tuple[str, list[str]]:
    """The problem document's detail (or title) and its list of violations, as text."""
    try:
        payload = response.json()
    except (json.JSONDecodeError, ValueError):
        return "", []
    if not isinstance(payload, dict):
        return "", []
    detail = str(payload.get("detail") or payload.get("title") or "")
    errors = [str(item) for item in payload.get("errors") or [] if item]
    return detail, errors


def _json_or_raise(response: httpx.Response, pod_id: str | None) -> Any:
    status = response.status_code
    if 200 <= status < 300:
        if status == 204 or not response.content:
            return None
        try:
            return response.json()
        except (json.JSONDecodeError, ValueError):
            raise ApiError(
                f"RunPod's API answered HTTP {status} with something that is not JSON.",
                "Check the API address (HCTL_RUNPOD_REST_URL); RunPod's is https://api.runpod.io.",
                retryable=True,
            ) from None
    raise problem_error(response, pod_id)


def problem_error(response: httpx.Response, pod_id: str | None = None) -> ProviderError:
    """An RFC 9457 answer as the hctl error it means."""
    status = response.status_code
    detail, violations = _problem(response)
    if status in (401, 403):
        return rejected_key(status, detail if status == 403 else "")
    if status == 429:
        return RateLimitedError(retry_after(response))
    if status >= 500:
        return server_error(status)
    if status == 404 and pod_id is not None:
        return PodNotFoundError(f"No pod with the id {pod_id!r}.")
    if status in (404, 405):
        return ApiError(
            f"There is no RunPod REST API at {response.request.url} (HTTP {status}).",
            "Check HCTL_RUNPOD_REST_URL; RunPod's is https://api.runpod.io.",
        )
    if status == 402:
        return ApiError(
            f"RunPod refused for lack of credit (HTTP 402): {detail}",
            "Add credit at https://www.runpod.io/console/user/billing, then try again.",
        )
    if status == 400 and any(text in detail.lower() for text in CAPACITY_TEXTS):
        return CapacityError(detail)
    if status == 409:
        return ApiError(f"RunPod refused: {detail} (HTTP 409).", "Check `hctl list-pods`.")
    if status == 422:
        listed = "; ".join(violations[:3])
        return ApiError(
            f"RunPod rejected hctl's request as invalid (HTTP 422): {detail}"
            + (f" ({listed})" if listed else ""),
            "This is a bug in hctl, or RunPod changed its API; please report it.",
        )
    return ApiError(
        f"RunPod said: {detail or f'HTTP {status}'}",
        "Check the pod in RunPod's console (https://www.runpod.io/console/pods) and try again.",
    )
