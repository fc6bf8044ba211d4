"""RunPod's GraphQL endpoint over httpx: authentication, timeouts, retries, and error translation.

This is the edge where httpx's exceptions and RunPod's error envelopes enter hctl; above it only
`hctl.errors` exist. What is retried depends on what repeating the request could do:

- `retry="always"` (reads, stop, resume, terminate): 429, 5xx, network errors and RunPod's opaque
  "Something went wrong" are retried with exponential backoff, honouring `Retry-After` (up to
  `MAX_WAIT_S`; a longer one is an error). A wait of `NOTICE_AFTER_S` or more is announced
  through `on_wait` (stderr by default), so hctl never sits silent.
- `retry="rate_limit_only"` (creates): only 429 is retried here, because a 429 was refused before
  anything happened. Any other transient failure is raised as `ApiError(retryable=True)`; the
  caller must first check whether the pod was created anyway (see `RunPodProvider.create`).

Authentication and validation errors are never retried.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import httpx

from hctl import __version__
from hctl.errors import ApiError, AuthError, CapacityError, ProviderError

Sleep = Callable[[float], None]
RetryPolicy = Literal["always", "rate_limit_only"]

CAPACITY_TEXT = "no longer any instances available"
SOMETHING_WENT_WRONG_TEXT = "something went wrong"
MAX_WAIT_S = 60.0  # a longer Retry-After is an error: hctl does not hang for minutes
NOTICE_AFTER_S = 2.0  # a wait this long or longer is announced, never silent


class RateLimitedError(ApiError):
    """HTTP 429: refused before anything happened, so even a create may be sent again."""

    def __init__(self, retry_after: float, *, waited: bool = True) -> None:
        if waited:
            message = "RunPod is limiting the rate of requests (HTTP 429)."
            hint = "Wait a minute and try again."
        else:
            message = (
                f"RunPod is limiting the rate of requests (HTTP 429) and asks to wait "
                f"{retry_after:.0f} s, longer than hctl waits on its own ({MAX_WAIT_S:.0f} s)."
            )
            hint = f"Try again in {retry_after / 60:.0f} minute(s); nothing was changed."
        super().__init__(message, hint, retryable=True)
        self.retry_after = retry_after


def _say_on_stderr(message: str) -> None:
    sys.stderr.write(f"note: {message}\n")
    sys.stderr.flush()


class GraphQLClient:
    """Sends one GraphQL document with its variables and returns `data`, or raises an HctlError."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout_s: float = 30.0,
        retries: int = 4,
        backoff_s: float = 1.0,
        sleep: Sleep = time.sleep,
        transport: httpx.BaseTransport | None = None,
        on_wait: Callable[[str], None] = _say_on_stderr,
    ) -> None:
        self.url = url
        self._on_wait = on_wait
        self._api_key = api_key
        self._retries = retries
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,
            headers={"User-Agent": f"hctl/{__version__}"},
        )

    def close(self) -> None:
        self._http.close()

    def execute(
        self, query: str, variables: dict[str, Any] | None = None, *, retry: RetryPolicy
    ) -> dict[str, Any]:
        """Run `query`; values travel only in `variables`, never inside the query text."""
        if not self._api_key:
            raise AuthError("No RunPod API key is set.")
        attempt = 0
        while True:
            try:
                return self._attempt(query, variables or {})
            except ProviderError as error:
                rate_limited = isinstance(error, RateLimitedError)
                may_retry = error.retryable and (retry == "always" or rate_limited)
                if not may_retry or attempt >= self._retries:
                    raise
                if isinstance(error, RateLimitedError):
                    if error.retry_after > MAX_WAIT_S:
                        raise RateLimitedError(error.retry_after, waited=False) from None
                    wait = error.retry_after
                else:
                    wait = self._backoff_s * 2**attempt
                wait = max(wait, 0.0)
                if wait >= NOTICE_AFTER_S:
                    self._on_wait(
                        f"{error.message} Retrying in {wait:.0f} s "
                        f"(retry {attempt + 1} of {self._retries})."
                    )
                self._sleep(wait)
                attempt += 1

    def _attempt(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(
                self.url,
                json={"query": query, "variables": variables},
                headers={"Authorization": f"Bearer {self._api_key}"},
            )
        except httpx.TimeoutException as error:
            raise ApiError(
                f"RunPod's API at {self.url} did not answer in time ({type(error).__name__}).",
                "Check your network connection and try again.",
                retryable=True,
            ) from None
        except httpx.HTTPError as error:
            raise ApiError(
                f"Cannot reach RunPod's API at {self.url}: {error or type(error).__name__}.",
                "Check your network connection, or the API address (HCTL_RUNPOD_API_URL).",
                retryable=True,
            ) from None
        return _data_or_raise(response)


def _data_or_raise(response: httpx.Response) -> dict[str, Any]:
    status = response.status_code
    if status == 401:
        raise AuthError("RunPod rejected the API key (HTTP 401).")
    if status == 403:
        raise AuthError(
            "RunPod refused this request for this API key (HTTP 403).",
            "Give the key read/write access at https://www.runpod.io/console/user/settings.",
        )
    if status in (404, 405):
        raise ApiError(
            f"There is no GraphQL API at {response.request.url} (HTTP {status}).",
            "Check HCTL_RUNPOD_API_URL; RunPod's is https://api.runpod.io/graphql.",
        )
    if status == 429:
        raise RateLimitedError(_retry_after(response))
    if status >= 500:
        raise ApiError(
            f"RunPod's API failed (HTTP {status}).",
            "RunPod may be having trouble; try again in a few minutes (https://uptime.runpod.io).",
            retryable=True,
        )
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
        return ApiError(
            f"RunPod failed with its generic error: {message}",
            "RunPod gives no reason for this one; try again in a few minutes, or look at the "
            "pod in RunPod's console (https://www.runpod.io/console/pods).",
            retryable=True,
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


def _retry_after(response: httpx.Response) -> float:
    """Seconds to wait from a `Retry-After` header; 1 s when absent or given as a date."""
    try:
        return max(float(response.headers.get("Retry-After", "1")), 0.0)
    except ValueError:
        return 1.0
