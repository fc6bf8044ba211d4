"""RunPod, over its two APIs: REST v2 (`rest_provider`, the default) and GraphQL
(`graphql_provider`, retiring early 2027; the only one with spot pods). `http` holds the retry loop
both share, `common` what else they share.
"""

from __future__ import annotations

from hctl.providers.runpod.graphql_provider import RunPodGraphQLProvider
from hctl.providers.runpod.rest_provider import RunPodRestProvider

__all__ = ["RunPodGraphQLProvider", "RunPodRestProvider"]
