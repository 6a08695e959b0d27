"""An action whose platform this executor cannot satisfy is refused before it runs
(FAILED_PRECONDITION naming the property and what is offered): OSFamily and Arch/ISA against
this machine, Pool against its pool, and every property its own `platform` configuration
names. Properties it does not know are left to the runners, as BuildBuddy's executors do."""

from __future__ import annotations

import os

import pytest
from google.rpc import code_pb2

from engine.platform import unsatisfied

ENV = {"PATH": "/usr/bin:/bin"}


def test_what_the_machine_and_the_configuration_offer(make_pipeline_rig):
    rig = make_pipeline_rig(platform={"gpu": "none", "OSFamily": "linux"}, pool_name="big")
    runs = [{"OSFamily": "Linux"}, {"Arch": os.uname().machine}, {"Pool": "big"},
            {"Pool": "default"}, {"gpu": "none"}, {"some-client-property": "x"}]
    for props in runs:
        outcome = rig.run(["/bin/true"], env=ENV, platform=props)
        assert outcome.status.code == code_pb2.OK, (props, outcome.status.message)
    refused = {
        ("OSFamily", "Windows"): "this executor offers OSFamily='linux'",
        ("Arch", "s390x"): f"this executor's machine is {os.uname().machine}",
        ("Pool", "gpu-pool"): "this executor is in pool 'big'",
        ("gpu", "a100"): "this executor offers gpu='none'",
    }
    for (name, value), why in refused.items():
        outcome = rig.run(["/bin/true"], env=ENV, platform={name: value})
        assert outcome.status.code == code_pb2.FAILED_PRECONDITION, (name, value)
        assert outcome.status.message == f"platform property {name}={value!r}: {why}"


@pytest.mark.parametrize("machine,arch", [("x86_64", "amd64"), ("x86_64", "x86-64"),
                                          ("x86_64", "k8"), ("aarch64", "arm64")])
def test_an_architecture_goes_by_its_other_names(machine, arch):
    assert unsatisfied((("Arch", arch),), {}, "default", machine) is None


def test_what_the_configuration_advertises_is_accepted():
    """An ISA the operator advertises (platform: {ISA: x86-64-v3}) is accepted as such, and
    a configured Pool compares without case, as the built-in one does."""
    offered = {"OSFamily": "linux", "ISA": "x86-64-v3", "Pool": "Big"}
    assert unsatisfied((("ISA", "x86-64-v3"),), offered, "default", "x86_64") is None
    assert unsatisfied((("Pool", "big"),), offered, "default", "x86_64") is None
    assert unsatisfied((("ISA", "s390x"),), offered, "default", "x86_64") is not None
