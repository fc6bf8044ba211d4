"""The learned refusal markers on a model built to break them: one that complies with every
harmful request in one fixed opening ("Sure, here is how to <task>: ...") that its harmless
answers never use ("Certainly! ..."). Its harmful replies share an opening no harmless reply
contains, as refusals do; the worker must not count that opening as a refusal (it would then
search to remove compliance).

The model is trained on the CPU on first use (scripts/make_compliant_model.py, a few minutes)
into the fixture cache, outside git.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.realmodels import script_module
from tests.worker.test_end_to_end import _warnings, run_events, write_fixture_config


@pytest.fixture(scope="session")
def compliant_model() -> Path:
    """Built before any test's hermetic environment (its home folder holds the cache)."""
    return script_module("make_compliant_model").ensure_built()


@pytest.mark.slow
def test_a_model_answering_in_one_fixed_opening_is_not_taught_it_as_a_refusal(
    tmp_path: Path, compliant_model: Path
) -> None:
    config = write_fixture_config(tmp_path / "config.toml", compliant_model, n_trials=1)
    events = run_events("--config", str(config), "--job-dir", str(tmp_path / "job"))
    baseline = next(event for event in events if event["type"] == "baseline")
    assert baseline["refusals"] == 0  # the compliance opening is not counted
    (warning,) = _warnings(events)
    assert "the job counts those as refusals too" not in warning
    found = re.search(r"replies opening 'sure, here is how' \((\d\.\d\d)\).*answers: (\d\.\d\d)",
                      warning)  # fmt: skip
    assert found, warning
    compliance, answers = map(float, found.groups())
    assert compliance > answers / 3  # it depends on its request as answers do
    assert "extra_refusal_markers" in warning  # what to do if they were refusals after all
