"""The rollout's pure policy (agent.fleet.rollout._spec) and state machines (_state): rates and
the exponential ramp, abort on evidence, refused combinations, refused transitions."""

from __future__ import annotations

import pytest

from agent.errors import RequestError
from agent.fleet.rollout import DeviceStep, RolloutSpec, abort_reason, start_rate
from agent.fleet.rollout._spec import check
from agent.fleet.rollout._state import TransitionError


def spec(**fields) -> RolloutSpec:
    return RolloutSpec(manifest="m.json", **fields)


@pytest.mark.parametrize(
    "fields, succeeded, rate",
    [
        ({}, 0, 10.0),  # the default
        ({"rate_per_min": 30}, 100, 30.0),  # fixed: successes change nothing
        ({"base_rate": 2, "increment_factor": 2, "ramp_every": 5}, 4, 2.0),
        ({"base_rate": 2, "increment_factor": 2, "ramp_every": 5}, 5, 4.0),
        ({"base_rate": 2, "increment_factor": 2, "ramp_every": 5}, 12, 8.0),
        ({"base_rate": 2, "increment_factor": 2, "ramp_every": 5, "max_rate": 6}, 12, 6.0),
        ({"base_rate": 1, "increment_factor": 3, "ramp_every": 1}, 10**6, 100_000.0),  # bounded
        ({"base_rate": 5, "increment_factor": 1}, 50, 5.0),
    ],
)
def test_start_rate_fixed_and_ramp(fields, succeeded, rate):
    assert start_rate(spec(**fields), succeeded) == pytest.approx(rate)


@pytest.mark.parametrize(
    "fields, succeeded, failed, devices, aborts",
    [
        ({}, 0, 1, 10, False),  # the first failure alone is not evidence (min_devices 5)
        ({}, 4, 1, 10, False),  # 1 of 5 = 20 %: not more than 20
        ({}, 9, 1, 10, False),
        ({}, 2, 3, 10, True),  # 3 of 5
        ({}, 7, 3, 10, True),  # 30 %
        ({}, 1, 2, 3, True),  # a rollout smaller than min_devices: all of it is the sample
        ({"min_devices": 1}, 0, 1, 10, True),
        ({"max_failures": 2}, 100, 2, 200, False),
        ({"max_failures": 2}, 100, 3, 200, True),  # 3 % but more than 2 failures
        ({"abort_percent": 100}, 0, 10, 10, False),
    ],
)
def test_abort_on_evidence(fields, succeeded, failed, devices, aborts):
    reason = abort_reason(spec(**fields), succeeded, failed, devices)
    assert (reason is not None) == aborts
    if reason is not None:
        assert str(failed) in reason


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"rate_per_min": 10, "base_rate": 1}, "rate_per_min"),
        ({"max_rate": 10}, "max_rate"),
        ({"base_rate": 10, "max_rate": 5}, "max_rate"),
        ({"soak_s": 600}, "soak_s"),
    ],
)
def test_refused_combinations_name_their_field(fields, field):
    with pytest.raises(RequestError) as caught:
        check(spec(**fields), device_timeout_s=600)
    assert caught.value.message.startswith(field)


def test_a_step_moves_only_along_its_table():
    step = DeviceStep("d", 0)
    step.move("starting", 1.0)
    with pytest.raises(TransitionError):
        step.move("done", 2.0)  # past the health gate without passing it
    for state in ("verifying", "canary", "soaking", "done", "rolling_back", "rolled_back"):
        step.move(state, 3.0)
    with pytest.raises(TransitionError):
        step.move("starting", 4.0)
