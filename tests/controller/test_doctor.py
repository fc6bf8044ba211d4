"""`hctl doctor` answers at once when the API is down: one try, no retries, `--json` too."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hctl.cli import app


def test_an_unreachable_api_is_reported_after_one_request(hctl_runpod_env) -> None:
    hctl_runpod_env.inject_fault("server_error", status=503, times=10)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 1
    checks = {check["name"]: check for check in json.loads(result.stdout)}
    assert not checks["RunPod API"]["ok"] and "503" in checks["RunPod API"]["detail"]
    assert len(hctl_runpod_env.requests) == 1  # not five tries with a minute of backoff


def test_a_healthy_api_passes_and_the_table_names_each_check(hctl_runpod_env) -> None:
    result = CliRunner().invoke(app, ["doctor"])
    assert "RunPod API key" in result.output and "reachable; 0 pod(s)" in result.output
