"""Where machines come from. `base` holds the boundary; one sub-package per cloud.

`PROVIDERS` is the registry: the `provider` setting (or `HCTL_PROVIDER`) names an entry,
`make_provider` builds it.
"""

from __future__ import annotations

from collections.abc import Callable

from hctl.errors import ConfigError
from hctl.providers.base import Provider
from hctl.providers.runpod import RunPodGraphQLProvider, RunPodRestProvider
from hctl.settings import Settings

PROVIDERS: dict[str, Callable[[Settings], Provider]] = {
    "runpod": RunPodRestProvider,  # RunPod's REST API v2
    "runpod-graphql": RunPodGraphQLProvider,  # RunPod's GraphQL API, until it retires
}


def make_provider(settings: Settings) -> Provider:
    """The provider the settings name, ready to use (it sends nothing until asked)."""
    factory = PROVIDERS.get(settings.provider)
    if factory is None:
        raise ConfigError(
            f"Unknown provider {settings.provider!r}.",
            f"Set `provider` to one of: {', '.join(sorted(PROVIDERS))}.",
        )
    return factory(settings)
