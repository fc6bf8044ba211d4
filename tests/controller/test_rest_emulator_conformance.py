"""The REST v2 emulator conforms to RunPod's OpenAPI document, as an independent tool sees it.

schemathesis reads the document (the copy in `tests/standins/`), generates requests for every
operation the emulator answers, sends them, and checks the answers: documented status codes,
content types, headers and bodies, no server errors, invalid data refused. Bounded (a few
examples per operation, no shrinking) so it stays a short test.

One schemathesis check is left out: `positive_data_acceptance` (a schema-valid request must not
get a 400). RunPod's own document says `createPod` answers 400 for rules its schema cannot state
("exactly one of gpu or cpu", no capacity) and for a GPU type it cannot place, so RunPod itself
would fail it.
"""

from __future__ import annotations

import json

import pytest

# The dev extra's (a laptop install's tests, `.[test]`, leave this one out).
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis comes with the dev extra")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from tests.standins.runpod_rest_emulator import SPEC_FILE, RunPodRestEmulator  # noqa: E402

OPERATIONS = [
    "listPods", "getPod", "createPod", "podAction", "deletePod", "getSshKeys", "updateSshKeys",
    "listGpuTypes", "getGpuType", "listPodBilling",
]  # fmt: skip
SCHEMA = schemathesis.openapi.from_dict(json.loads(SPEC_FILE.read_text(encoding="utf-8")))


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_the_emulator_answers_as_runpods_document_says(
    rest_emulator: RunPodRestEmulator, operation_id: str
) -> None:
    operation = SCHEMA.find_operation_by_id(operation_id)
    headers = {"Authorization": f"Bearer {rest_emulator.api_key}"}

    @settings(max_examples=8, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy())
    def conforms(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=rest_emulator.url, headers=headers, excluded_checks=[positive_data_acceptance]
        )

    conforms()
    # Requests schemathesis made invalid on purpose were refused, and recorded as such.
    rest_emulator.invalid_requests.clear()
    assert rest_emulator.invalid_responses == []
