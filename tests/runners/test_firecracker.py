"""Isolation type firecracker is detection only (engine/runners/firecracker.py): what this
machine lacks is named, and the type is never offered where anything is missing."""

from __future__ import annotations

import os

from engine.config import Config
from engine.runners import firecracker


def test_what_is_missing_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no firecracker binary
    lacking = firecracker.missing(Config(kernel_image_path=str(tmp_path / "vmlinux")))
    assert lacking[0] == "the firecracker binary (not on PATH)"
    assert lacking[1] == f"a guest kernel (isolation.kernel_image_path: no file " \
                         f"{tmp_path / 'vmlinux'})"
    assert lacking[2] == "a root filesystem image (isolation.rootfs_image_path is not set)"
    assert firecracker.why_not(Config()).startswith("this machine lacks the firecracker "
                                                    "binary")


def test_with_everything_present_it_is_still_refused_as_not_built(tmp_path, monkeypatch):
    if firecracker.kvm_problem() is not None:
        return  # no usable KVM here: the test above covers the refusal
    binary = tmp_path / "firecracker"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tmp_path / "vmlinux").write_bytes(b"\0")
    (tmp_path / "rootfs.ext4").write_bytes(b"\0")
    monkeypatch.setenv("PATH", str(tmp_path))
    config = Config(kernel_image_path=str(tmp_path / "vmlinux"),
                    rootfs_image_path=str(tmp_path / "rootfs.ext4"))
    assert firecracker.missing(config) == []
    assert "the firecracker runner is not built yet" in firecracker.why_not(config)


def test_a_device_that_is_not_kvm_is_told_apart(tmp_path):
    assert firecracker.kvm_problem(os.devnull).startswith(
        f"{os.devnull}: KVM_GET_API_VERSION failed")
    assert "No such file" in firecracker.kvm_problem(str(tmp_path / "kvm"))
