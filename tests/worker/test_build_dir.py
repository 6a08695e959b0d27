import asyncio
import glob
import os
import shutil
import subprocess
import sys

import pytest
from worker_helpers import FN, Blobs

from engine import digest as digests
from engine.cas.local_disk import LocalDiskStore
from engine.pipeline.build_dir import ActionDir, ActionDirPool, prepare_outputs
from engine.pipeline.copy_inputs import CopyInputs
from engine.pipeline.inputs import InputError, resolve_tree, stage
from engine.proto import re_pb2
from engine.runners.bare import run
from engine.runners.protocol import RunRequest

NOBODY = (65534, 65534)
OTHER = (60990, 60990)  # a slot uid of its own
IS_ROOT = os.geteuid() == 0


def command(**kw) -> re_pb2.Command:
    return re_pb2.Command(arguments=["true"], **kw)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def test_layout_and_cleanup(tmp_path):
    ad = ActionDir.create(str(tmp_path / "builds"))
    assert os.path.isdir(ad.root) and os.path.isdir(ad.tmp)
    assert os.path.dirname(ad.root) == ad.path == os.path.dirname(ad.stdout_path)
    other = ActionDir.create(str(tmp_path / "builds"))
    assert other.path != ad.path
    # Read-only directories and files, as an action may leave them.
    os.makedirs(os.path.join(ad.root, "a/b"))
    with open(os.path.join(ad.root, "a/b/f"), "w") as f:
        f.write("x")
    os.chmod(os.path.join(ad.root, "a/b/f"), 0o444)
    os.chmod(os.path.join(ad.root, "a/b"), 0o500)
    os.chmod(os.path.join(ad.root, "a"), 0o000)
    ad.cleanup()
    assert not os.path.exists(ad.path)
    ad.cleanup()  # twice is fine
    assert os.listdir(tmp_path / "builds") == [os.path.basename(other.path)]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as another user")
def test_cleanup_of_read_only_dirs_when_not_root(open_dir):
    # Root ignores permissions, so run cleanup() as nobody on a tree nobody owns.
    base = os.path.join(open_dir, "builds")
    os.mkdir(base)
    os.chown(base, *NOBODY)
    ad = ActionDir.create(base)
    os.makedirs(os.path.join(ad.root, "x/y"))
    open(os.path.join(ad.root, "x/y/f"), "w").close()
    for dirpath, _, files in os.walk(ad.path):
        os.chown(dirpath, *NOBODY)
        for f in files:
            os.chown(os.path.join(dirpath, f), *NOBODY)
    os.chown(ad.path, *NOBODY)
    os.chmod(os.path.join(ad.root, "x/y"), 0o500)
    os.chmod(os.path.join(ad.root, "x"), 0o000)
    code = ("import sys; from engine.pipeline.build_dir import ActionDir; "
            "ActionDir(sys.argv[1], None).cleanup()")
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    sys.executable, "-c", code, ad.path], check=True, cwd="/",
                   env={"PYTHONPATH": os.path.dirname(os.path.dirname(digests.__file__))})
    assert not os.path.exists(ad.path)


def test_output_paths_parents_are_created_relative_to_working_directory(root):
    os.makedirs(root / "w")
    created = prepare_outputs(command(working_directory="w",
                                      output_paths=["a/b/c.o", "a/d", "top", "../up/x"]),
                              str(root))
    assert sorted(created) == ["up", "w/a", "w/a/b"]
    assert (root / "w/a/b").is_dir() and not (root / "w/a/d").exists()
    assert not (root / "w/top").exists()


def test_legacy_fields_create_parents_but_not_output_directories(root):
    created = prepare_outputs(command(output_files=["f/g/x"], output_directories=["d/e", ""]),
                              str(root))
    assert sorted(created) == ["d", "f", "f/g"]
    assert not (root / "d/e").exists()


def test_output_paths_override_legacy_fields(root):
    prepare_outputs(command(output_paths=["p/x"], output_files=["legacy/x"]), str(root))
    assert (root / "p").is_dir() and not (root / "legacy").exists()


@pytest.mark.parametrize("field,path,problem", [
    ("output_paths", "/abs/x", "absolute"),
    ("output_paths", "../x", "outside"),
    ("output_paths", "a/../../x", "outside"),
    ("output_paths", "a/", "trailing slash"),
    ("output_paths", "a//b", "empty component"),
    ("output_paths", "a\0b", "NUL"),
    ("output_files", "", "empty path"),
    ("output_files", "/x", "absolute"),
    ("output_directories", "../..", "outside"),
])
def test_bad_output_paths_are_rejected_naming_the_field(root, field, path, problem):
    with pytest.raises(InputError, match=f"{field}: .*{problem}"):
        prepare_outputs(command(**{field: [path]}), str(root))


def test_bad_working_directory_is_rejected(root):
    with pytest.raises(InputError, match="working_directory: .*outside"):
        prepare_outputs(command(working_directory="..", output_paths=["x"]), str(root))
    ad = ActionDir(str(root.parent), None)
    with pytest.raises(InputError, match="working_directory: 'nope' is not a directory"):
        ad.working_directory(command(working_directory="nope"))
    os.symlink("/tmp", root / "escape")
    with pytest.raises(InputError, match="working_directory: .*outside"):
        ad.working_directory(command(working_directory="escape"))
    os.mkdir(root / "sub")
    assert ad.working_directory(command(working_directory="sub/.")) == str(root / "sub")
    assert ad.working_directory(command()) == str(root)


def test_parent_that_is_a_file_or_escaping_symlink_is_rejected(root, tmp_path):
    (root / "file").write_text("x")
    with pytest.raises(InputError, match="output_paths: 'file/x': parent 'file' .*not a dir"):
        prepare_outputs(command(output_paths=["file/x"]), str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "out")
    with pytest.raises(InputError, match="symlink"):
        prepare_outputs(command(output_paths=["out/sub/x"]), str(root))
    assert list(outside.iterdir()) == []


def test_parent_symlink_inside_the_root_is_followed(root):
    os.makedirs(root / "real")
    os.symlink("real", root / "alias")
    created = prepare_outputs(command(output_paths=["alias/sub/x"]), str(root))
    assert created == ["real/sub"] and (root / "real/sub").is_dir()


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_run_as_gets_directories_but_not_files(open_dir, store):
    b = Blobs()
    tree_root = b.directory(files=[("in.txt", b"input", False)],
                            dirs=[("pkg", b.directory(files=[("x", b"x", False)]))])
    for d, data in b.data.items():
        store.write_bytes(d, data)
    ad = ActionDir.create(os.path.join(open_dir, "builds"), run_as=NOBODY)
    tree = resolve_tree(FN, tree_root, b.get)
    stage(tree, store, ad.root)
    ad.hand_over(tree.dirs)
    created = ad.prepare_outputs(command(output_paths=["pkg/out/y"]))
    assert created == ["pkg/out"]
    for d in ("", "pkg", "pkg/out"):
        assert os.stat(os.path.join(ad.root, d)).st_uid == 65534
    assert os.stat(ad.tmp).st_uid == 65534
    assert os.stat(os.path.join(ad.root, "in.txt")).st_uid == 0
    assert os.stat(os.path.join(ad.root, "pkg/x")).st_uid == 0
    ad.cleanup()


def test_build_root_not_searchable_is_a_clear_error(tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(PermissionError, match="not searchable by uid 65534"):
        ActionDir.create(str(locked / "builds"), run_as=NOBODY)


@pytest.mark.skipif(not IS_ROOT, reason="the protection is for a root Stoker")
def test_action_run_as_nobody_cannot_corrupt_the_cache(open_dir):
    """The cached inode is hardlinked into the exec root. Run as root the action could
    write through it; run as nobody it cannot, and the cache blob stays intact."""
    base = open_dir
    content = b"precious cached content\n"
    d = digests.of_bytes(FN, content)

    def attempt(run_as, copy=False):
        store = LocalDiskStore(os.path.join(base, f"cas-{run_as is None}-{copy}"))
        b = Blobs()
        root_d = b.directory(files=[("in.txt", content, False)],
                             dirs=[("out", b.directory())])
        for bd, data in b.data.items():
            store.write_bytes(bd, data)
        ad = ActionDir.create(os.path.join(base, "builds"), run_as=run_as)
        tree = resolve_tree(FN, root_d, b.get)
        stage(tree, CopyInputs(store) if copy else store, ad.root)
        ad.hand_over(tree.dirs)
        cwd = ad.working_directory(command())
        script = ("chmod u+w in.txt; echo CORRUPTED > in.txt; "
                  "printf 'ok' > out/result; exit 0")
        req = RunRequest(["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, cwd, "",
                         ad.stdout_path, ad.stderr_path, ad.tmp, run_as=run_as)
        asyncio.run(run(req))
        with open(ad.stderr_path) as f:
            err = f.read()
        with open(os.path.join(ad.root, "out/result")) as f:
            wrote_output = f.read() == "ok"
        ad.cleanup()
        try:
            blob = store.read_bytes(d)
        except OSError:  # the store notices the size change
            blob = None
        finally:
            store.close()
        return blob, err, wrote_output

    blob, err, wrote_output = attempt(NOBODY)
    assert wrote_output  # the action can still write its outputs
    assert "Permission denied" in err or "Operation not permitted" in err
    assert blob == content and digests.of_bytes(FN, blob) == d

    # Control: the same action run as root does corrupt its (throwaway) cache...
    blob, _, _ = attempt(None)
    assert blob != content
    # ...unless its inputs are copies, as they are for actions that share Stoker's uid.
    blob, err, wrote_output = attempt(None, copy=True)
    assert wrote_output and blob == content, err


def test_pool_reuses_an_emptied_directory(tmp_path):
    pool = ActionDirPool(str(tmp_path / "builds"), keep=1)
    ad = pool.acquire(None)
    os.makedirs(os.path.join(ad.root, "out/sub"))
    with open(os.path.join(ad.root, "out/sub/f"), "w") as f:
        f.write("x")
    os.chmod(os.path.join(ad.root, "out/sub"), 0o500)  # left read-only by the action
    with open(os.path.join(ad.tmp, "scratch"), "w") as f:
        f.write("y")
    for p in (ad.stdout_path, ad.stderr_path):
        with open(p, "w") as f:
            f.write("old output")
    os.chmod(ad.root, 0o700)
    pool.release(ad)
    again = pool.acquire(None)
    assert again is ad
    assert os.listdir(ad.root) == [] and os.listdir(ad.tmp) == []
    assert not os.path.exists(ad.stdout_path) and not os.path.exists(ad.stderr_path)
    assert os.stat(ad.root).st_mode & 0o777 == 0o700
    # A second one at once is fresh; releasing beyond keep removes it.
    other = pool.acquire(None)
    assert other.path != ad.path
    pool.release(again)
    pool.release(other)
    assert not os.path.exists(other.path)
    pool.close()
    assert os.listdir(tmp_path / "builds") == []


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as another user")
def test_pool_gives_back_owner_and_mode_to_run_as(open_dir):
    pool = ActionDirPool(os.path.join(open_dir, "builds"), keep=2)
    ad = pool.acquire(NOBODY)
    os.chown(ad.tmp, 0, 0)
    os.chmod(ad.tmp, 0o777)
    pool.release(ad)
    # Kept for its own uid only: another identity gets a directory of its own.
    other = pool.acquire(OTHER)
    assert other is not ad and os.stat(other.root).st_uid == OTHER[0]
    assert pool.acquire(NOBODY) is ad
    st = os.stat(ad.tmp)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (*NOBODY, 0o700)
    st = os.stat(ad.root)
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY[0], 0o700)
    # Searchable by the action, listable by nobody else.
    assert os.stat(ad.path).st_mode & 0o777 == 0o711
    assert os.stat(os.path.join(open_dir, "builds")).st_mode & 0o777 == 0o711
    pool.release(other)
    pool.close()


def test_pool_does_not_reuse_a_directory_with_extended_attributes(tmp_path):
    pool = ActionDirPool(str(tmp_path / "builds"), keep=2)
    ad = pool.acquire(None)
    try:
        os.setxattr(ad.root, "user.stoker-test", b"1")
    except OSError as e:
        pytest.skip(f"no user xattrs on this filesystem: {e}")
    pool.release(ad)
    assert not os.path.exists(ad.path)
    assert pool.acquire(None).path != ad.path


@pytest.mark.skipif(not IS_ROOT or shutil.which("chattr") is None,
                    reason="needs root and chattr for an undeletable file")
def test_a_directory_that_cannot_be_removed_is_quarantined_not_raised(tmp_path):
    from engine.pipeline import remove
    from engine.pipeline.build_dir import quarantine_dir

    build_root = str(tmp_path / "build" / "worker-0")
    ad = ActionDir.create(build_root)
    stuck = os.path.join(ad.root, "stuck")
    with open(stuck, "w") as f:
        f.write("x")
    if subprocess.run(["chattr", "+i", stuck], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    try:
        ad.cleanup()  # must not raise
        assert not os.path.exists(ad.path)
        qdir = quarantine_dir(build_root)
        [moved] = os.listdir(qdir)
        assert remove.purge_quarantine(qdir) == [os.path.join(qdir, moved)]
    finally:
        for found in glob.glob(str(tmp_path / "build/quarantine/*/root/stuck")):
            subprocess.run(["chattr", "-i", found], check=True)
    assert remove.purge_quarantine(quarantine_dir(build_root)) == []
    assert os.listdir(quarantine_dir(build_root)) == []


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as other users")
def test_lock_down_takes_the_tree_back_from_fds_other_uids_hold(open_dir):
    """Another action's process that got an fd into this exec root (passed over a socket)
    cannot change its entries once the tree is locked down."""
    from engine.pipeline.build_dir import lock_down

    owner, other = 60971, 60972
    root = os.path.join(open_dir, "root")
    os.makedirs(os.path.join(root, "out", "sub"))
    for d in (root, os.path.join(root, "out"), os.path.join(root, "out", "sub")):
        os.chown(d, owner, owner)
        os.chmod(d, 0o777)  # what the action may have done to let the other in
    code = ("import os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "try:\n"
            "    os.rename('sub', 'moved', src_dir_fd=fd, dst_dir_fd=fd)\n"
            "    print('renamed')\n"
            "except OSError as e:\n"
            "    print('refused', e.errno)\n")
    holder = subprocess.Popen(["setpriv", f"--reuid={other}", f"--regid={other}",
                               "--clear-groups", "/usr/bin/python3", "-c", code,
                               os.path.join(root, "out")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    assert holder.stdout.readline().strip() == "ready"
    lock_down(root)
    out, _ = holder.communicate("\n", timeout=30)
    assert out.split()[0] == "refused"
    for d in ("", "out", "out/sub"):
        st = os.stat(os.path.join(root, d))
        assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
    # Any depth, one fd at a time: a 2,000-level tree (paths far past PATH_MAX).
    deep = os.path.join(open_dir, "deep")
    fd = os.open(open_dir, os.O_RDONLY)
    os.mkdir("deep", dir_fd=fd)
    cur = os.open("deep", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    for _ in range(2000):
        os.mkdir("d", 0o777, dir_fd=cur)
        os.chown("d", owner, owner, dir_fd=cur)
        nxt = os.open("d", os.O_RDONLY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.close(cur)
    lock_down(deep)
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(2000):
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        st = os.fstat(fd)
        assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
    os.close(fd)
    subprocess.run(["rm", "-rf", deep], check=True)
