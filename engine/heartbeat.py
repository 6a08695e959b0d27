"""Heartbeat files: each child touches its file from its event loop; the supervisor reads
the mtime. A loop that stops turning stops beating, which is the point: a free-running
thread would keep beating while the loop is stuck. The files live on tmpfs (/dev/shm) so a
beat costs no disk I/O."""

from __future__ import annotations

import asyncio
import os

ENV = "STOKER_HEARTBEAT_FILE"
INTERVAL_S = 1.0


def beat(path: str | None) -> None:
    if path:
        try:
            os.utime(path)
        except FileNotFoundError:
            open(path, "w").close()


async def beat_forever(path: str | None) -> None:
    while True:
        beat(path)
        await asyncio.sleep(INTERVAL_S)


def age_s(path: str, now: float) -> float:
    try:
        return now - os.stat(path).st_mtime
    except FileNotFoundError:
        return float("inf")
