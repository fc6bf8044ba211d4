"""RunPod's GraphQL API (retiring early 2027): one document with its variables → `data`.

Values always travel in `variables`, never inside the query text. RunPod answers resolver
failures with HTTP 200 and an `errors` list; they become hctl errors here (see
`shared/reference/runpod-api.md` §1). Retries are `http.ApiHttp`'s.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from hctl.errors import ApiError, AuthError, CapacityError, ProviderError
from hctl.providers.runpod.http import (
    ApiHttp,
    OutcomeUnknownError,
    RateLimitedError,
    RetryPolicy,
    rejected_key,
    retry_after,
    server_error,
)

CAPACITY_TEXT = "no longer any instances available"
SOMETHING_WENT_WRONG_TEXT = "something went wrong"


class GraphQLClient:
    """Sends GraphQL documents to RunPod and returns `data`, or raises an HctlError."""

    def __init__(self, http: ApiHttp) -> None:
        self.http = http

    def close(self) -> None:
        self.http.close()

    def execute(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        retry: RetryPolicy,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return self.http.call(
            "POST",
            "",
            _data_or_raise,
            retry=retry,
            json={"query": query, "variables": variables or {}},
            timeout_s=timeout_s,
        )


def _data_or_raise(response: httpx.Response) -> dict[str, Any]:
    status = response.status_code
    if status in (401, 403):
        raise rejected_key(status)
    if status in (404, 405):
        raise ApiError(
            f"There is no GraphQL API at {response.request.url} (HTTP {status}).",
            "Check HCTL_RUNPOD_API_URL; RunPod's is https://api.runpod.io/graphql.",
        )
    if status == 429:
        raise RateLimitedError(retry_after(response))
    if status >= 500:
        raise server_error(status)
    try:
        payload = response.json()
    except (json.JSONDecodeError, ValueError):
        raise ApiError(
            f"RunPod's API answered HTTP {status} with something that is not JSON.",
            "Check the API address (HCTL_RUNPOD_API_URL); it should end in /graphql.",
            retryable=status == 200,
        ) from None
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if errors:
        raise _resolver_error(errors[0], status)
    if status != 200 or not isinstance(payload.get("data"), dict):
        raise ApiError(
            f"RunPod's API answered HTTP {status} without data.",
            "Check the API address (HCTL_RUNPOD_API_URL).",
        )
    return payload["data"]


def _resolver_error(error: dict[str, Any], status: int) -> ProviderError:
    message = str(error.get("message") or "unknown error")
    lowered = message.lower()
    if CAPACITY_TEXT in lowered:
        return CapacityError(message)
    if "unauthorized" in lowered:
        return AuthError(f"RunPod rejected the API key: {message}")
    if SOMETHING_WENT_WRONG_TEXT in lowered or (error.get("extensions") or {}).get("code") == (
        "INTERNAL_SERVER_ERROR"
    ):
        return OutcomeUnknownError(
            f"RunPod failed with its generic error: {message}",
            "RunPod gives no reason for this one; try again in a few minutes, or look at the "
            "pod in RunPod's console (https://www.runpod.io/console/pods).",
        )
    if status == 400:
        return ApiError(
            f"RunPod rejected hctl's request as invalid: {message}",
            "This is a bug in hctl, or RunPod changed its API; please report it.",
        )
    return ApiError(
        f"RunPod said: {message}",
        "Check the pod in RunPod's console (https://www.runpod.io/console/pods) and try again.",
    )
