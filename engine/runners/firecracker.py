"""Isolation type `firecracker`: detection only. A microVM per action needs the firecracker
binary, a guest kernel (isolation.kernel_image_path), a root filesystem
(isolation.rootfs_image_path) and a usable /dev/kvm; this says which of them this machine
lacks, so the type is advertised nowhere and an action asking for it is refused naming them.

The runner itself is not built: the machines Stoker is developed on have no firecracker and
a /dev/kvm (kvm_pvm, a nested software hypervisor) on which stock guest kernels do not boot
(DESIGN.md section 6), so no line of it could be tested here. Where everything is present,
the type is still refused, saying so.
"""

from __future__ import annotations

import fcntl
import os
import shutil

from engine.config import Config

FIRECRACKER = "firecracker"
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12  # the only one Linux has ever had


def kvm_problem(device: str = "/dev/kvm") -> str | None:
    """Why device is no usable KVM, or None."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{device}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as e:
        return f"{device}: KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return f"{device}: KVM API version {version}, not {_KVM_API_VERSION}"
    return None


def missing(config: Config) -> list[str]:
    """What a microVM per action would need and this machine lacks."""
    lacking = []
    if shutil.which(FIRECRACKER) is None:
        lacking.append(f"the {FIRECRACKER} binary (not on PATH)")
    for key, path, what in (("kernel_image_path", config.kernel_image_path, "a guest kernel"),
                            ("rootfs_image_path", config.rootfs_image_path,
                             "a root filesystem image")):
        if not path:
            lacking.append(f"{what} (isolation.{key} is not set)")
        elif not os.path.isfile(path):
            lacking.append(f"{what} (isolation.{key}: no file {path})")
    kvm = kvm_problem()
    if kvm is not None:
        lacking.append(f"a usable KVM ({kvm})")
    return lacking


def why_not(config: Config) -> str:
    """Why firecracker is not offered here."""
    lacking = missing(config)
    if lacking:
        return "this machine lacks " + "; ".join(lacking)
    return ("everything it needs is here, but the firecracker runner is not built yet "
            "(detection only)")
