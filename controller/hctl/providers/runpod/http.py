"""RunPod's APIs over httpx: authentication, timeouts, and the one retry loop both APIs share.

This is the edge where httpx's exceptions enter hctl; above it only `hctl.errors` exist. Each
API (`graphql`, `rest`) turns an answer into data or an error; this module decides what is sent
again, by what repeating the request could do:

- `retry="always"` (reads, stop, start, terminate): 429, 5xx, network errors and answers that
  may not have been applied are retried with exponential backoff, honouring `Retry-After` (up to
  `MAX_WAIT_S`; a longer one is an error, since hctl does not hang for minutes).
- `retry="rate_limit_only"` (creates): a 429 was refused before anything happened, and a
  connection that was never made sent nothing, so those are retried here. Any other failure is
  raised: an `OutcomeUnknownError` (no answer, a 5xx, RunPod's "Something went wrong") means the
  create may have been applied, and the caller must look for the pod before anything else (see
  `hctl.providers.runpod.common.create_once`).

Authentication and validation errors are never retried. `pause` is the one place that waits;
a wait of `NOTICE_AFTER_S` or more is announced there (`on_wait`, stderr by default), so hctl
never sits silent, whichever API it talks to.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx

from hctl import __version__
from hctl.errors import ApiError, AuthError, ProviderError

if TYPE_CHECKING:
    from hctl.settings import Settings

Sleep = Callable[[float], None]
RetryPolicy = Literal["always", "rate_limit_only"]
T = TypeVar("T")

MAX_WAIT_S = 60.0  # a longer Retry-After is an error: hctl does not hang for minutes
NOTICE_AFTER_S = 2.0  # a wait this long or longer is announced, never silent


class RateLimitedError(ApiError):
    """HTTP 429: refused before anything happened, so even a create may be sent again.

    `waited=False`: RunPod asked for a wait longer than hctl waits on its own (`MAX_WAIT_S`).
    """

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


class OutcomeUnknownError(ApiError):
    """The request was sent and failed without saying whether it was applied."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint, retryable=True)


class ConnectFailedError(ApiError):
    """No connection was made: nothing was sent, so anything may be sent again."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint, retryable=True)


def say_on_stderr(message: str) -> None:
    """How a wait is announced unless told otherwise: a `note:` line on stderr."""
    sys.stderr.write(f"note: {message}\n")
    sys.stderr.flush()


def retry_after(response: httpx.Response) -> float:
    """Seconds to wait from a `Retry-After` header; 1 s when absent or given as a date."""
    try:
        return max(float(response.headers.get("Retry-After", "1")), 0.0)
    except ValueError:
        return 1.0


class ApiHttp:
    """One RunPod API: its address, the key, the timeouts, and the retry loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        address_setting: str,
        timeout_s: float = 30.0,
        retries: int = 4,
        backoff_s: float = 1.0,
        sleep: Sleep = time.sleep,
        transport: httpx.BaseTransport | None = None,
        on_wait: Callable[[str], None] = say_on_stderr,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.address_setting = address_setting  # named in hints, e.g. HCTL_RUNPOD_REST_URL
        self._api_key = api_key
        self._retries = retries
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._on_wait = on_wait
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,
            headers={"User-Agent": f"hctl/{__version__}"},
        )

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        base_url: str,
        *,
        address_setting: str,
        sleep: Sleep = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> ApiHttp:
        """The API at `base_url` with the key, timeouts and retries the settings give."""
        key = settings.runpod_api_key.get_secret_value() if settings.runpod_api_key else None
        return cls(
            base_url,
            key,
            address_setting=address_setting,
            timeout_s=settings.api_timeout_s,
            retries=settings.api_retries,
            backoff_s=settings.api_backoff_s,
            sleep=sleep,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        read: Callable[[httpx.Response], T],
        *,
        retry: RetryPolicy,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> T:
        """Send one request (again, as `retry` allows) and return what `read` makes of the answer.

        `read` raises the API's errors; `timeout_s` replaces the read timeout (a create waits
        longer for its answer than a read does).
        """
        if not self._api_key:
            raise AuthError("No RunPod API key is set.")
        attempt = 0
        while True:
            try:
                response = self._send(method, path, json, params, timeout_s)
                return read(response)
            except ProviderError as error:
                if not self._may_retry(error, retry) or attempt >= self._retries:
                    raise
                if isinstance(error, RateLimitedError):
                    self.pause(error.retry_after, error, retry=attempt + 1)
                else:
                    self.pause(self._backoff_s * 2**attempt, error, retry=attempt + 1)
                attempt += 1

    def pause(self, seconds: float, reason: ProviderError, *, retry: int | None = None) -> None:
        """Wait before sending again: the one place hctl waits on an API.

        A `Retry-After` longer than MAX_WAIT_S is raised as an error (nothing was changed);
        a backoff is cut to MAX_WAIT_S. A wait of NOTICE_AFTER_S or more is announced first.
        """
        if isinstance(reason, RateLimitedError) and seconds > MAX_WAIT_S:
            raise RateLimitedError(seconds, waited=False) from None
        wait = min(max(seconds, 0.0), MAX_WAIT_S)
        if wait >= NOTICE_AFTER_S:
            which = f" (retry {retry} of {self._retries})" if retry is not None else ""
            self._on_wait(f"{reason.message} Retrying in {wait:.0f} s{which}.")
        self._sleep(wait)

    @staticmethod
    def _may_retry(error: ProviderError, retry: RetryPolicy) -> bool:
        if not error.retryable:
            return False
        if retry == "always":
            return True
        return isinstance(error, RateLimitedError | ConnectFailedError)

    def _send(
        self,
        method: str,
        path: str,
        json: Any,
        params: dict[str, Any] | None,
        timeout_s: float | None,
    ) -> httpx.Response:
        url = f"{self.base_url}{path}"
        options: dict[str, Any] = {}
        if timeout_s is not None:
            options["timeout"] = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        try:
            return self._http.request(
                method,
                url,
                json=json,
                params=params,
                headers={"Authorization": f"Bearer {self._api_key}"},
                **options,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise ConnectFailedError(
                f"Cannot reach RunPod's API at {url}: {error or type(error).__name__}.",
                f"Check your network connection, or the API address ({self.address_setting}).",
            ) from None
        except httpx.TimeoutException as error:
            raise OutcomeUnknownError(
                f"RunPod's API at {url} did not answer in time ({type(error).__name__}).",
                "Check your network connection and try again.",
            ) from None
        except httpx.HTTPError as error:
            raise OutcomeUnknownError(
                f"Cannot reach RunPod's API at {url}: {error or type(error).__name__}.",
                f"Check your network connection, or the API address ({self.address_setting}).",
            ) from None


def server_error(status: int) -> OutcomeUnknownError:
    return OutcomeUnknownError(
        f"RunPod's API failed (HTTP {status}).",
        "RunPod may be having trouble; try again in a few minutes (https://uptime.runpod.io).",
    )


def rejected_key(status: int, detail: str = "") -> AuthError:
    if status == 403:
        return AuthError(
            "RunPod refused this request for this API key (HTTP 403)"
            + (f": {detail}" if detail else "."),
            "Give the key read/write access at https://www.runpod.io/console/user/settings.",
        )
    return AuthError(f"RunPod rejected the API key (HTTP {status}).")
