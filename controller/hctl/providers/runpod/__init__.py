"""RunPod: pods and GPU types over RunPod's GraphQL API (`provider`), sent by `client`."""

from __future__ import annotations

from hctl.providers.runpod.provider import RunPodProvider

__all__ = ["RunPodProvider"]
