"""The platform properties an action runs with: one reading for admission (the server's
Execute) and for the choice of runner (the worker)."""

from __future__ import annotations

import platform as _host
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import Config

from engine.proto import re_pb2
from engine.runners.protocol import Platform

# What the platform properties say about this machine unless the config says otherwise.
OS_FAMILY = "linux"
ISA = {"x86_64": "x86-64", "aarch64": "aarch64"}.get(_host.machine(), _host.machine())


def advertised_platform(config: Config) -> dict[str, str]:
    """The platform properties this executor sends its scheduler (Buildbarn matches them
    exactly against what clients send), and that actions are held to: the machine's
    OSFamily and ISA unless the config's platform says otherwise."""
    return {"OSFamily": OS_FAMILY, "ISA": ISA, **config.platform}


def platform_of(action: re_pb2.Action, command: re_pb2.Command | None) -> Platform:
    """The Action's own properties (REAPI v2.2+), else its Command's, which older clients
    only set; sorted by name then value."""
    props = action.platform.properties
    if not props and command is not None:
        props = command.platform.properties
    return tuple(sorted((p.name, p.value) for p in props))


def value_of(platform: Platform, name: str) -> str | None:
    """The value of property `name` (compared without case, as BuildBuddy does), or None."""
    lowered = name.lower()
    for key, value in platform:
        if key.lower() == lowered:
            return value
    return None


# Names an architecture goes by (Bazel's cpu names, Go's, the kernel's), per machine().
_ARCH_NAMES = {"x86_64": {"x86_64", "x86-64", "amd64", "k8"},
               "aarch64": {"aarch64", "arm64"}}


def unsatisfied(platform: Platform, offered: dict[str, str], pool: str,
                machine: str) -> str | None:
    """Why this executor cannot run an action of this platform, or None.

    Only what it can tell: OSFamily and Arch/ISA against this machine, Pool against its
    pool, and each property its own platform configuration names against that value (names
    without case; values of OSFamily, Arch and Pool too). Properties it does not know are
    left alone, as BuildBuddy's executors do: the runners read theirs
    (workload-isolation-type, container-image, dockerNetwork, ...)."""
    names = _ARCH_NAMES.get(machine, {machine})
    lowered = {k.lower(): (k, v) for k, v in offered.items()}
    for name, value in platform:
        key = name.lower()
        if key in lowered and key not in ("isa", "arch"):
            want = lowered[key][1]
            same = (value.lower() == want.lower() if key in ("osfamily", "pool")
                    else value == want)
            if not same:
                return f"platform property {name}={value!r}: this executor offers " \
                       f"{lowered[key][0]}={want!r}"
        elif key in ("arch", "isa") and value.lower() not in names and \
                value.lower() != lowered.get(key, ("", ""))[1].lower():
            return f"platform property {name}={value!r}: this executor's machine is " \
                   f"{machine}"
        elif key == "osfamily" and value.lower() != "linux":
            return f"platform property {name}={value!r}: this executor runs linux"
        elif key == "pool" and value.lower() not in ("", "default", pool.lower()):
            return f"platform property {name}={value!r}: this executor is in pool " \
                   f"{pool!r}"
    return None
