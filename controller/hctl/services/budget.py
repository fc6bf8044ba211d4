"""Money: what a job has cost so far, what it will cost at this pace, and the cap.

Spending is the machine's price per hour times the time since it started billing for this job,
plus whatever earlier machines of the same job cost (a resumed job). It is an estimate of the
bill, computed from the pod's own `costPerHr`, not a bill.
"""

from __future__ import annotations

from dataclasses import dataclass

from hctl.errors import BudgetError
from hctl.services.estimate import Estimate, format_money


@dataclass(frozen=True)
class Meter:
    """A running machine's spend."""

    price_per_hour: float
    started_at: float  # epoch seconds
    spent_before: float = 0.0

    def spent(self, now: float) -> float:
        hours = max(0.0, now - self.started_at) / 3600
        return self.spent_before + self.price_per_hour * hours

    def projected(self, now: float, remaining_seconds: float) -> float:
        return self.spent(now) + self.price_per_hour * max(0.0, remaining_seconds) / 3600

    def cap_reached(self, now: float, max_cost: float | None) -> bool:
        return max_cost is not None and self.spent(now) >= max_cost


def check_estimate_within(estimate: Estimate, max_cost: float | None) -> None:
    """Refuse before anything is created when the estimate is over the cap."""
    if max_cost is None or estimate.total_cost is None:
        return
    if estimate.total_cost > max_cost:
        raise BudgetError(
            f"The estimate for this job is {format_money(estimate.total_cost)}, above "
            f"--max-cost {format_money(max_cost)}. Nothing was created.",
            "Raise --max-cost, use fewer --trials, or a cheaper GPU (`hctl estimate MODEL`).",
        )
