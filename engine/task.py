"""Our own types for a unit of work, so the pipeline never sees a scheduler's wire messages.

Each scheduler adapter turns its lease (a Remote Workers API Lease, later a BuildBuddy task or
a Buildbarn operation) into an ActionTask and an ActionOutcome back into its wire form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.rpc import code_pb2, status_pb2

from engine.proto import re_pb2

# gRPC metadata for a call: text values, or bytes for keys ending in -bin.
CallMetadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class ActionTask:
    id: str  # the scheduler's opaque name for this work
    action: re_pb2.Action
    digest_function: str = "sha256"
    instance_name: str = ""
    action_digest: str = ""  # "hash/size" when the scheduler says (for logs), else ""
    command: re_pb2.Command | None = None  # when the scheduler sends it with the task
    # Headers for this task's calls to the scheduler's CAS (BuildBuddy's per-task JWT).
    cache_metadata: CallMetadata = ()
    # Whose build it is, where the scheduler says (BuildBuddy: the JWT's group); "" else.
    tenant: str = ""


@dataclass
class Usage:
    """What one action used, as measured here (0: not measured): for schedulers that size
    later tasks from it (BuildBuddy)."""
    cpu_nanos: int = 0  # the command's user + system time
    peak_memory_bytes: int = 0  # its largest resident set
    blobs_fetched: int = 0  # inputs brought from the remote CAS
    local_cache_hits: int = 0  # inputs the local CAS already had
    fetch_seconds: float = 0.0
    bytes_uploaded: int = 0
    upload_seconds: float = 0.0


@dataclass
class ActionOutcome:
    """What the pipeline hands back: the ActionResult and the execution status.

    A non-zero exit code is a result with status OK. DEADLINE_EXCEEDED carries the partial
    result. `retry` marks infrastructure failures the scheduler should run again elsewhere.
    """

    result: re_pb2.ActionResult = field(default_factory=re_pb2.ActionResult)
    status: status_pb2.Status = field(default_factory=lambda: status_pb2.Status(code=code_pb2.OK))
    retry: bool = False
    message: str = ""  # for ExecuteResponse.message, where the scheduler relays one
    usage: Usage = field(default_factory=Usage)

    @property
    def ok(self) -> bool:
        return self.status.code == code_pb2.OK
