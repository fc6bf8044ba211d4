"""The GraphQL documents hctl sends to RunPod. Values always travel in `variables`.

Every document validates against RunPod's own schema (`runpod-graphql-schema.graphql`, copied
into `tests/standins/`, where the emulator executes it). Selections follow what RunPod's own
clients read (runpod-python, runpodctl; see `shared/reference/runpod-api.md`). `machine { podHostId }` is the SSH proxy's user name; RunPod's
Python SDK never selects it, which is why its users could not find the proxy address.
"""

from __future__ import annotations

# What a pod answer carries; `runtime` is null until the container is up (the readiness signal).
POD_FIELDS = """
    id name desiredStatus podType costPerHr gpuCount imageName env containerDiskInGb
    volumeInGb volumeMountPath ports createdAt
    machine { podHostId gpuDisplayName gpuTypeId secureCloud }
    runtime {
      uptimeInSeconds ports { ip isIpPublic privatePort publicPort type }
      gpus { gpuUtilPercent memoryUtilPercent }
    }
"""

# Mutation answers leave `runtime` out: it is always null right after a create or a resume.
POD_SUMMARY_FIELDS = """
    id name desiredStatus podType costPerHr gpuCount imageName env containerDiskInGb
    volumeInGb volumeMountPath ports createdAt
    machine { podHostId gpuDisplayName gpuTypeId secureCloud }
"""

# Stock is asked per cloud (aliases), so a quote can name the cloud a pod will land in.
GPU_TYPES = """
query GpuTypes($secure: GpuLowestPriceInput!, $community: GpuLowestPriceInput!) {
  gpuTypes {
    id displayName memoryInGb secureCloud communityCloud
    securePrice communityPrice secureSpotPrice communitySpotPrice maxGpuCount
    secureStock: lowestPrice(input: $secure) { stockStatus }
    communityStock: lowestPrice(input: $community) { stockStatus }
  }
}
"""

LIST_PODS = f"query Pods {{ myself {{ pods {{ {POD_FIELDS} }} }} }}"

GET_POD = f"query Pod($podId: String!) {{ pod(input: {{podId: $podId}}) {{ {POD_FIELDS} }} }}"

CREATE_POD = f"""
mutation CreatePod($input: PodFindAndDeployOnDemandInput!) {{
  podFindAndDeployOnDemand(input: $input) {{ {POD_SUMMARY_FIELDS} }}
}}
"""

CREATE_SPOT_POD = f"""
mutation CreateSpotPod($input: PodRentInterruptableInput!) {{
  podRentInterruptable(input: $input) {{ {POD_SUMMARY_FIELDS} }}
}}
"""

# What a stopped spot pod must bid to run again (not the bid it had: that is long gone).
SPOT_RESUME_PRICE = """
query SpotResumePrice($podId: String!) {
  pod(input: {podId: $podId}) { id podType gpuCount lowestBidPriceToResume }
}
"""

STOP_POD = """
mutation StopPod($podId: String!) { podStop(input: {podId: $podId}) { id desiredStatus } }
"""

RESUME_POD = """
mutation ResumePod($podId: String!, $gpuCount: Int!) {
  podResume(input: {podId: $podId, gpuCount: $gpuCount}) { id desiredStatus costPerHr }
}
"""

BID_RESUME_POD = """
mutation BidResumePod($podId: String!, $bidPerGpu: Float!, $gpuCount: Int!) {
  podBidResume(input: {podId: $podId, bidPerGpu: $bidPerGpu, gpuCount: $gpuCount}) {
    id desiredStatus costPerHr
  }
}
"""

# `podTerminate` returns a scalar (null): no selection.
TERMINATE_POD = """
mutation TerminatePod($podId: String!) { podTerminate(input: {podId: $podId}) }
"""

MY_PUBLIC_KEYS = "query MyPublicKeys { myself { id pubKey } }"

UPDATE_PUBLIC_KEYS = """
mutation UpdatePublicKeys($input: UpdateUserSettingsInput) {
  updateUserSettings(input: $input) { id }
}
"""
