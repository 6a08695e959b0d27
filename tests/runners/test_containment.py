"""Every process an action started is dead when the runner returns: survivors of each kind
(setsid, setpgid, double fork, a non-dumpable one, a timeout with children), under both
mechanisms that need root (pid namespace, uid sweep). Real processes, real uids."""

import asyncio
import os
import shutil
import subprocess
import time
import uuid

import pytest

from engine.runners import containment
from engine.runners.bare import run
from engine.runners.protocol import RunRequest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as slot uids")

UID = 60977  # a slot uid no other test uses
# The system's: the virtualenv's may sit under a home the slot uid cannot enter.
PY = "/usr/bin/python3"

# Each survivor re-parents away from the action and keeps writing a file it names by an
# absolute path, so the test sees whether it still runs.
SURVIVORS = {
    "setsid": "import os,sys,time\nif os.fork()==0:\n os.setsid()\n {loop}\nos._exit(0)",
    "setpgid": "import os,sys,time\nif os.fork()==0:\n os.setpgid(0,0)\n {loop}\nos._exit(0)",
    "double-fork": ("import os,sys,time\nif os.fork()==0:\n os.setsid()\n if os.fork()==0:\n"
                    "  {loop}\n os._exit(0)\nos._exit(0)"),
    "non-dumpable": ("import os,sys,time,ctypes\nif os.fork()==0:\n os.setsid()\n"
                     " ctypes.CDLL(None).prctl(4,0,0,0,0)\n {loop}\nos._exit(0)"),
}
LOOP = "while True:\n  open(sys.argv[1],'a').write('x'); time.sleep(0.01)"
if os.uname().machine == "x86_64":
    # Its leader thread exits alone (SYS_exit, 60): /proc shows the process as a zombie
    # while its second thread goes on.
    SURVIVORS["zombie-leader"] = (
        "import os,sys,time,threading,ctypes\nif os.fork()==0:\n os.setsid()\n"
        " def loop():\n  {loop}\n threading.Thread(target=loop).start()\n"
        " time.sleep(0.2)\n ctypes.CDLL(None).syscall(60, 0)\ntime.sleep(1)\nos._exit(0)")


def mechanisms():
    found = [containment.UID_SWEEP]
    if os.geteuid() == 0 and containment.detect(True) == containment.PID_NAMESPACE:
        found.append(containment.PID_NAMESPACE)
    return found


@pytest.fixture
def slot(open_dir):
    root = os.path.join(open_dir, "root")
    os.mkdir(root, 0o700)
    os.chown(root, UID, UID)
    yield root
    containment.sweep([UID])


def request(root: str, argv: list[str], timeout: float = 0) -> RunRequest:
    base = os.path.dirname(root)
    return RunRequest(argv, {"PATH": "/usr/bin:/bin"}, root, "", os.path.join(base, "out"),
                      os.path.join(base, "err"), root, timeout_s=timeout, run_as=(UID, UID))


def assert_nothing_runs(marker_file: str) -> None:
    live, _ = containment.processes_of([UID])
    assert live == []
    size = os.path.getsize(marker_file) if os.path.exists(marker_file) else 0
    time.sleep(0.2)
    after = os.path.getsize(marker_file) if os.path.exists(marker_file) else 0
    assert after == size, "a survivor is still writing"


@pytest.mark.parametrize("mechanism", mechanisms())
@pytest.mark.parametrize("kind", sorted(SURVIVORS))
def test_survivors_are_dead_when_run_returns(slot, mechanism, kind):
    marker = os.path.join(slot, f"alive-{uuid.uuid4().hex}")
    indent = {"double-fork": 2, "zombie-leader": 2}.get(kind, 1)
    code = SURVIVORS[kind].format(loop=LOOP.replace("\n", "\n" + " " * indent))
    r = asyncio.run(run(request(slot, [PY, "-c", code, marker]), mechanism))
    assert r.exit_code == 0, open(os.path.join(os.path.dirname(slot), "err")).read()
    assert_nothing_runs(marker)


@pytest.mark.parametrize("mechanism", mechanisms())
def test_timeout_kills_the_whole_tree(slot, mechanism):
    marker = os.path.join(slot, "alive")
    code = SURVIVORS["double-fork"].format(loop=LOOP.replace("\n", "\n  "))
    script = f"{PY} -c \"$CODE\" {marker}; exec sleep 60"
    req = request(slot, ["sh", "-c", script], timeout=1.0)
    req.env["CODE"] = code
    t0 = time.monotonic()
    r = asyncio.run(run(req, mechanism))
    assert r.timed_out and time.monotonic() - t0 < 10
    assert_nothing_runs(marker)


def test_sweep_finds_processes_by_any_of_their_ids(open_dir):
    """A process of the uid is found however it hides: its own session, non-dumpable (its
    /proc entry then belongs to root)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not installed")
    code = "import ctypes,time; ctypes.CDLL(None).prctl(4,0,0,0,0); time.sleep(60)"
    proc = subprocess.Popen([setpriv, f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                             PY, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        # Found by its ids in /proc/PID/status, not by the owner of /proc/PID (which is
        # root's for a non-dumpable process on many kernels).
        while proc.pid not in containment.processes_of([UID])[0]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)  # past its prctl
        assert containment.sweep([UID]) == []
        proc.wait(timeout=10)  # the sweep reaped it already: it was our child
        assert not os.path.exists(f"/proc/{proc.pid}")
        assert containment.processes_of([UID + 1])[0] == []
    finally:
        proc.kill()
        proc.wait()


def test_mechanism_is_the_strongest_available():
    assert containment.detect(False) in (containment.PID_NAMESPACE, containment.SESSION)
    found = containment.detect(True)
    assert found in (containment.PID_NAMESPACE, containment.UID_SWEEP)
    if shutil.which("unshare") and found == containment.UID_SWEEP:
        # Then the machine must really refuse pid namespaces.
        done = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
        assert done.returncode != 0


@pytest.mark.skipif(shutil.which("ipcmk") is None, reason="util-linux ipcmk not installed")
def test_system_v_ipc_left_behind_dies_with_the_namespace(slot):
    if containment.PID_NAMESPACE not in mechanisms():
        pytest.skip("no pid namespaces here")
    r = asyncio.run(run(request(slot, ["ipcmk", "-M", "4096"]), containment.PID_NAMESPACE))
    assert r.exit_code == 0
    listed = subprocess.run(["ipcs", "-m", "-c"], capture_output=True, text=True).stdout
    assert str(UID) not in listed
