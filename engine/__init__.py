"""Stoker: a remote-execution executor for the Bazel Remote Execution API v2."""

__version__ = "0.1.0"
