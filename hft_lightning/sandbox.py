"""Runs untrusted generated Python against unit tests, outside the training process.

Design. ``run_tests`` starts one runner per batch (``python -I -S`` on this file, in a new session, in a
throwaway directory, with an environment holding only ``PATH``) and hands it the batch on stdin. The
runner forks one child per program, at most one per usable CPU at a time. Each child, before any
candidate code runs:

* enters its own Linux namespaces (below) when the kernel allows them;
* points stdin, stdout and stderr at ``/dev/null`` and closes every other descriptor except its own
  result pipe and the directories it imports the standard library from;
* moves into its own empty directory and, when started as root, drops to ``nobody`` (uid/gid 65534, no
  supplementary groups): root ignores file permissions and ``RLIMIT_NPROC``, nobody does not;
* sets ``PR_SET_NO_NEW_PRIVS`` (set-user-ID binaries cannot give root back), ``PR_SET_DUMPABLE`` off
  (other programs cannot read or write its memory through ptrace or ``/proc``), ``PR_SET_PDEATHSIG``
  (it dies with the runner) and the limits: CPU seconds, address space, no new processes or threads,
  file size, open files, no core dumps.

Namespaces. The runner moves into a network namespace with no interface up (every connection fails,
loopback included), which the programs of the batch share. Each child unshares a mount namespace, a PID
namespace and an IPC namespace, then forks the process that runs the program: the first process of the
new PID namespace, which sees no other process and can signal none. In the mount namespace every mount
is remounted read-only, an empty private tmpfs covers ``/tmp`` (the program's working directory),
``/dev/shm`` and (read-only) ``/run``, and ``/proc`` shows the new PID namespace only. A caller that is
not root gets the same through a user namespace that maps only its own uid and gid (entered by the
runner with the network namespace); the child clears the capabilities that namespace gave it once its
mounts are set, so a program cannot undo them. ``unshare``, ``mount`` and ``capset`` go through libc
with ``ctypes``: ``os`` has only ``unshare``, and only from Python 3.12. Where the kernel refuses any of
it (a container without ``CAP_SYS_ADMIN``, unprivileged user namespaces disabled), the runner finds out
with a throwaway child before the batch and runs it with the isolation above minus the namespaces;
``run_tests`` warns once per process naming what failed. ``docs/sandbox.md`` has the threat model and
the measured cost.

Result channel. The runner creates a pipe and a random 16-byte nonce per child. The child writes the
nonce once when its sandbox is set up, then compiles the program and the tests, executes the program,
executes every test statement in the program's namespace and only then writes the nonce a second time.
The runner counts a pass iff it read exactly the nonce twice. Exit statuses and output are ignored, so
``os._exit(0)``, ``sys.exit(0)``, a crash, a timeout or printed "passed" text before the tests finish
score as failures; the tests are compiled, and ``exec``, ``os.write`` and ``os._exit`` bound, before the
program runs, so rebinding builtins or ``os`` attributes cannot skip the tests. A child that never wrote the
first nonce but reported an exception failed to set up (an environment fault, not a candidate's):
the runner reports it and ``run_tests`` raises ``RuntimeError`` instead of silently scoring zero.

Timeouts. The runner kills a child ``timeout_s`` after forking it (``RLIMIT_CPU`` backs this up); with
namespaces the program's process dies with it (``PR_SET_PDEATHSIG``, checked against a pipe the child
holds for the window before it is set). The caller kills the runner's whole process group if the batch
overruns its budget.

Standard library under a private install. The interpreter may live where nobody cannot enter (pyenv
under ``/root``, mode 700). The runner opens each ``sys.path`` directory as root; the child imports
through ``/proc/self/fd/<fd>``, a descriptor it holds, and so reads the standard library but no other
file that nobody could not read.

Residual risks. Not a security boundary against a deliberate attacker: a program that introspects the
interpreter (frames, ``gc``, ``ctypes``) can find its nonce and forge its own pass, and one that
rebinds names the tests use or returns an object equal to everything passes weak asserts. It cannot
forge another program's result: the other pipes are closed in it and the other children's memory is
out of its reach. It can read every file its user can read. Without namespaces, programs run as nobody
can also write to world-writable directories such as ``/tmp`` (1 MiB per file), open network sockets and
signal other processes of nobody (they can make a sibling fail, never pass); started as a non-root user,
programs run as that user and can modify whatever it can. There is no seccomp filter.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import re
import resource
import select
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

_NOBODY = 65534
_CLEAN_ENV = {"PATH": "/usr/bin:/bin"}
_NONCE_BYTES = 16
_FILE_SIZE_LIMIT = 1 << 20
_OPEN_FILES_LIMIT = 64
# Margin on the caller's deadline for the runner itself: interpreter start, forks, a loaded machine.
_RUNNER_SLACK_S = 30.0
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MS_RELATIME = 0x200000
_MS_STRICTATIME = 0x1000000
# Per-mount options a read-only remount must repeat, as /proc/self/mountinfo names them: a user namespace may
# not clear them.
_KEPT_MOUNT_OPTIONS = {
    b"nosuid": _MS_NOSUID,
    b"nodev": _MS_NODEV,
    b"noexec": _MS_NOEXEC,
    b"noatime": _MS_NOATIME,
    b"nodiratime": _MS_NODIRATIME,
    b"relatime": _MS_RELATIME,
}
# The private /tmp and /dev/shm: 1 MiB per file already (RLIMIT_FSIZE), this bounds the memory they can hold.
_TMPFS_OPTIONS = b"mode=1777,size=16m,nr_inodes=1024"
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_log = logging.getLogger(__name__)
# Tests turn this off to exercise the fallback on a machine that has namespaces.
_USE_NAMESPACES = True
# The isolations already reported in this process, so each is said once.
_reported: set[str | None] = set()


def run_tests(
    programs: Sequence[str], tests: Sequence[Sequence[str]], timeout_s: float = 2.0, memory_mb: int = 512
) -> list[bool]:
    r"""Executes each program with its unit tests in a sandbox and reports which pass.

    All programs of a call share one runner subprocess, but each runs in its own forked child with its
    own limits (and namespaces, where the kernel allows them), so nothing one program does can change
    another's result. The first call logs the isolation the programs get; a call that could not give them
    their own namespaces warns, once per process, naming why.

    Args:
        programs: Python sources, e.g. ``"def add_3(x):\n    return x + 3"``.
        tests: For each program, Python statements (usually ``assert``) executed in the program's
            namespace after it, e.g. ``["assert add_3(1) == 4"]``. An empty list checks that the program
            runs.
        timeout_s: Wall-clock seconds allowed per program, tests included; CPU time is capped at the
            next whole second.
        memory_mb: Address-space limit per program in MiB, the interpreter's own mappings (about
            20 MiB) included.

    Returns:
        ``result[i]`` is True iff program ``i`` ran and every one of its tests passed.

    Raises:
        ValueError: If the arguments are inconsistent or out of range.
        RuntimeError: If the sandbox itself cannot start or set up a program (an environment fault,
            never a consequence of what a program does).

    Example::

        >>> run_tests(["def add_3(x):\n    return x + 3"], [["assert add_3(1) == 4"]])
        [True]
    """
    if len(programs) != len(tests):
        raise ValueError(f"programs and tests must have the same length, got {len(programs)} and {len(tests)}")
    for i, program_tests in enumerate(tests):
        if isinstance(program_tests, str):
            raise ValueError(f"tests[{i}] must be a list of statements, got a single string")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s}")
    if not isinstance(memory_mb, int) or memory_mb <= 0:
        raise ValueError(f"memory_mb must be a positive integer, got {memory_mb!r}")
    if not programs:
        return []
    reply = _call_runner(list(programs), [list(t) for t in tests], timeout_s, memory_mb)
    _report_isolation(reply["missing"])
    return [bool(passed) for passed in reply["results"]]


def namespaces_unavailable() -> str | None:
    """Says why ``run_tests`` cannot give programs their own namespaces here, probing in a runner.

    Returns:
        None when every program gets its own mount, PID and IPC namespaces in a network namespace
        without interfaces, otherwise the failure that prevents it (e.g. ``"[Errno 1] unshare(network):
        Operation not permitted"``).
    """
    return _call_runner([], [], timeout_s=1.0, memory_mb=1)["missing"]


def _call_runner(programs: list[str], tests: list[list[str]], timeout_s: float, memory_mb: int) -> dict:
    payload = {
        "programs": programs,
        "tests": tests,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "namespaces": _USE_NAMESPACES,
    }
    rounds = math.ceil(len(programs) / _worker_count(len(programs)))
    budget_s = rounds * (timeout_s + 1.0) + _RUNNER_SLACK_S
    with tempfile.TemporaryDirectory(prefix="hft-sandbox-", ignore_cleanup_errors=True) as workdir:
        runner = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            cwd=workdir,
            env=_CLEAN_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = runner.communicate(json.dumps(payload).encode(), timeout=budget_s)
        except BaseException as exc:
            # Still unreaped, so its pid (the process group id) cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise RuntimeError(f"sandbox runner exceeded its {budget_s:.0f} s budget") from None
            raise
    if runner.returncode != 0:
        detail = err.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"sandbox runner failed with status {runner.returncode}: {detail}")
    return json.loads(out)


def _report_isolation(missing: str | None) -> None:
    if missing in _reported:
        return
    _reported.add(missing)
    if missing is None:
        _log.info("code sandbox: every program runs in its own mount, PID and IPC namespaces, without network")
    else:
        caller = "" if os.geteuid() == 0 else "; they run as this process's user and can change its files"
        warnings.warn(
            f"code sandbox without Linux namespaces ({missing}): generated programs can open network connections, "
            f"write to world-writable directories such as /tmp, and see and signal other processes of their user"
            f"{caller} (docs/sandbox.md)",
            RuntimeWarning,
            stacklevel=3,
        )


def _worker_count(n: int) -> int:
    return max(1, min(n, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class _Setup:
    """What every child of a batch applies to itself before its program runs."""

    timeout_s: float
    memory_mb: int
    import_fds: dict[str, int]
    namespaces: bool

    def workdir(self, index: int) -> str:
        """The program's working directory: its private ``/tmp``, or the runner's subdirectory for it."""
        return "/tmp" if self.namespaces else str(index)


@dataclass
class _Child:
    pid: int
    fd: int
    nonce: bytes
    deadline: float
    index: int
    data: bytes = b""


def _run_batch(
    programs: list[str], tests: list[list[str]], timeout_s: float, memory_mb: int, namespaces: bool
) -> tuple[list[bool], str | None]:
    """Runner side: forks a sandboxed child per program and collects the verdicts from their pipes.

    Returns:
        The verdicts, and why the programs ran without namespaces (None if they had them).
    """
    missing = _namespaces_missing() if namespaces else "turned off"
    if missing is None:
        _enter_batch_namespaces()
    drop_privileges = os.geteuid() == 0
    setup = _Setup(timeout_s, memory_mb, _open_import_dirs() if drop_privileges else {}, missing is None)
    if not setup.namespaces:
        for i in range(len(programs)):
            os.mkdir(setup.workdir(i), 0o700)
            if drop_privileges:
                os.chown(setup.workdir(i), _NOBODY, _NOBODY)
    results = [False] * len(programs)
    setup_errors: list[str] = []
    running: dict[int, _Child] = {}
    selector = selectors.DefaultSelector()
    next_index = 0
    workers = _worker_count(len(programs))

    def finish(child: _Child) -> None:
        selector.unregister(child.fd)
        os.close(child.fd)
        del running[child.fd]
        # A zombie ignores the signal; one still running (it closed the pipe itself, or timed out) dies.
        os.kill(child.pid, signal.SIGKILL)
        os.waitpid(child.pid, 0)
        if child.data.startswith(b"!") and not child.data.startswith(child.nonce):  # before the program ran
            setup_errors.append(f"program {child.index}: {child.data[1:].decode(errors='replace')}")
        results[child.index] = child.data == 2 * child.nonce

    try:
        while next_index < len(programs) or running:
            while next_index < len(programs) and len(running) < workers:
                child = _fork_child(next_index, programs[next_index], tests[next_index], setup)
                running[child.fd] = child
                selector.register(child.fd, selectors.EVENT_READ, child)
                next_index += 1
            wait_s = min(child.deadline for child in running.values()) - time.monotonic()
            for key, _ in selector.select(max(wait_s, 0.0)):
                child = key.data
                chunk = os.read(child.fd, 4 * _NONCE_BYTES)
                child.data += chunk
                if not chunk or len(child.data) > 2 * _NONCE_BYTES:
                    finish(child)
            now = time.monotonic()
            for child in [c for c in running.values() if c.deadline <= now]:
                finish(child)
    finally:
        for child in running.values():
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
    if setup_errors:
        raise RuntimeError("sandbox setup failed: " + "; ".join(setup_errors[:3]))
    return results, missing


def _open_import_dirs() -> dict[str, int]:
    """Opens each importable ``sys.path`` directory while still root, so the child can import through it."""
    fds = {}
    for path in sys.path:
        try:
            fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
    return fds


def _fork_child(index: int, program: str, tests: list[str], setup: _Setup) -> _Child:
    nonce = os.urandom(_NONCE_BYTES)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:  # the child must never return into the runner's loop, whatever the program raised or rebound
            _child_main(program, tests, nonce, write_fd, setup.workdir(index), setup)
        finally:
            os._exit(1)
    os.close(write_fd)
    return _Child(pid=pid, fd=read_fd, nonce=nonce, deadline=time.monotonic() + setup.timeout_s, index=index)


def _child_main(program: str, tests: list[str], nonce: bytes, result_fd: int, workdir: str, setup: _Setup) -> NoReturn:
    # Bound before the program runs: it may rebind builtins.exec, os.write or os._exit.
    run, write, exit_ = exec, os.write, os._exit
    try:
        _enter_sandbox(result_fd, workdir, setup)
    except BaseException as exc:
        write(result_fd, f"!{exc!r}".encode())
        exit_(1)
    write(result_fd, nonce)
    try:
        code = compile(program, "<program>", "exec")
        checks = tuple(compile(statement, "<test>", "exec") for statement in tests)
        namespace: dict[str, object] = {"__name__": "__program__"}
        run(code, namespace)
        for check in checks:
            run(check, namespace)
    except BaseException:
        exit_(1)
    write(result_fd, nonce)
    exit_(0)


def _enter_sandbox(result_fd: int, workdir: str, setup: _Setup) -> None:
    """Isolates the current (forked) process; see the module docstring for what each step prevents."""
    parent_alive = _enter_namespaces(result_fd) if setup.namespaces else None
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    keep = {0, 1, 2, result_fd, *setup.import_fds.values()}
    if parent_alive is not None:
        keep.add(parent_alive)
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:  # the descriptor listdir itself used, already closed
                continue
    os.chdir(workdir)
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(_NOBODY)
        os.setuid(_NOBODY)
        _import_through(setup.import_fds)
    elif setup.namespaces:
        _drop_capabilities()
    # After the credentials changed: a change clears PR_SET_PDEATHSIG.
    for option, value in ((_PR_SET_NO_NEW_PRIVS, 1), (_PR_SET_DUMPABLE, 0), (_PR_SET_PDEATHSIG, signal.SIGKILL)):
        _check(_LIBC.prctl(option, value, 0, 0, 0), f"prctl({option})")
    if parent_alive is not None:
        if select.select([parent_alive], [], [], 0)[0]:  # EOF: the parent was killed before the line above
            os._exit(1)
        os.close(parent_alive)
    cpu_s = math.ceil(setup.timeout_s)
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
        (resource.RLIMIT_NPROC, (0, 0)),
        (resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT)),
        (resource.RLIMIT_NOFILE, (_OPEN_FILES_LIMIT, _OPEN_FILES_LIMIT)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_AS, (setup.memory_mb << 20, setup.memory_mb << 20)),
    ):
        resource.setrlimit(limit, value)


def _enter_batch_namespaces() -> None:
    """Moves the runner into a network namespace with no interface up, which all its children share.

    A caller that is not root enters a user namespace with it, mapping only its own uid and gid: there the
    children may create their other namespaces and mount. One network namespace per batch rather than per
    program: creating and destroying one costs far more than the others (see ``docs/sandbox.md``), and
    the programs of a batch can reach nothing through it but each other's abstract Unix sockets.
    """
    uid, gid = os.geteuid(), os.getegid()
    user = {_CLONE_NEWUSER: "user"} if uid != 0 else {}
    _unshare(user | {_CLONE_NEWNET: "network"})
    if uid != 0:
        for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
            try:
                os.write(fd, line.encode())
            except OSError as exc:
                raise OSError(exc.errno, f"writing {line!r} to /proc/self/{name}: {exc.strerror}") from None
            finally:
                os.close(fd)


def _enter_namespaces(result_fd: int) -> int:
    """Moves this (forked) process into new namespaces and returns in the first process of the PID one.

    ``unshare`` moves only the caller's future children into a new PID namespace, so this process forks the
    one that returns, then waits for it and exits: the runner kills this one, and the other dies with it
    through ``PR_SET_PDEATHSIG``, which the caller sets once its credentials are final.

    Returns:
        A descriptor that reads end-of-file once the parent is gone: the caller checks it after setting
        ``PR_SET_PDEATHSIG``, which does nothing for a parent that is already dead.
    """
    _check(_LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    _unshare({_CLONE_NEWNS: "mount", _CLONE_NEWPID: "PID", _CLONE_NEWIPC: "IPC"})
    alive_read, alive_write = os.pipe()  # reads EOF in the new process once this one is gone
    pid = os.fork()
    if pid:
        os.close(result_fd)
        os.waitpid(pid, 0)
        os._exit(0)
    os.close(alive_write)
    _private_filesystem()
    return alive_read


def _unshare(namespaces: dict[int, str]) -> None:
    """Unshares the namespaces given as ``{CLONE_NEW* flag: name}``, naming them if the kernel refuses."""
    _check(_LIBC.unshare(sum(namespaces)), f"unshare({', '.join(namespaces.values())})")


def _private_filesystem() -> None:
    """Remounts every mount read-only, then mounts private ``/tmp``, ``/dev/shm``, ``/run`` and ``/proc``."""
    _mount(None, b"/", None, _MS_REC | _MS_PRIVATE)  # so that nothing below propagates back to the host
    for point, options in _mounts():
        if b"ro" in options:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        flags |= sum(flag for option, flag in _KEPT_MOUNT_OPTIONS.items() if option in options)
        if not options & {b"noatime", b"relatime"}:
            flags |= _MS_STRICTATIME
        try:
            _mount(None, point, None, flags)
        except OSError as exc:
            if exc.errno != errno.EACCES:  # EACCES: out of the caller's reach, so of the program's (its user's) too
                raise
    # /run is left empty and read-only: it holds the sockets of system services (D-Bus, Docker), and a
    # read-only mount does not stop a connect().
    for point, read_only in ((b"/tmp", 0), (b"/dev/shm", 0), (b"/run", _MS_RDONLY)):
        if os.path.isdir(point):
            _mount(b"tmpfs", point, b"tmpfs", read_only | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, _TMPFS_OPTIONS)
    _mount(b"proc", b"/proc", b"proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _mounts() -> list[tuple[bytes, set[bytes]]]:
    """This mount namespace's mount points, parents first, with their per-mount options (``/proc/self/mountinfo``)."""
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        fields = [line.split() for line in mountinfo]
    unescape = re.compile(rb"\\([0-7]{3})")  # mountinfo writes a space in a path as \040
    return [(unescape.sub(lambda m: bytes([int(m[1], 8)]), f[4]), set(f[5].split(b","))) for f in fields]


def _mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    _check(_LIBC.mount(source, target, fstype, flags, data), f"mount {target.decode(errors='replace')}")


def _drop_capabilities() -> None:
    """Clears every capability of this process, those its user namespace gave it included."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)  # pid 0: this process
    none = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for capabilities 0-31, then 32-63
    _check(_LIBC.capset(header, none), "capset")


def _namespaces_missing() -> str | None:
    """Enters the batch's and a program's namespaces in a throwaway child; returns why it failed, or None."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _enter_batch_namespaces()
            _enter_namespaces(write_fd)
        except BaseException as exc:
            os.write(write_fd, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        error = pipe.read()  # until both the child and the process it forked have exited
    os.waitpid(pid, 0)
    return error.decode(errors="replace") or None


def _check(result: int, call: str) -> None:
    """Raises ``OSError`` naming ``call`` if a libc call failed (returned nonzero)."""
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{call}: {os.strerror(code)}")


def _import_through(import_fds: dict[str, int]) -> None:
    """Rewrites import paths to ``/proc/self/fd/<fd>``, reachable after nobody lost access to the originals."""

    def remap(path: str) -> str:
        for directory, fd in import_fds.items():
            if path == directory or path.startswith(directory + os.sep):
                return f"/proc/self/fd/{fd}{path[len(directory) :]}"
        return path

    sys.path[:] = [remap(path) for path in sys.path]
    for module in list(sys.modules.values()):
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):  # already-imported packages find their submodules here
            package_path[:] = [remap(path) for path in package_path]
    sys.path_importer_cache.clear()


def _runner_main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    results, missing = _run_batch(
        request["programs"], request["tests"], request["timeout_s"], request["memory_mb"], request["namespaces"]
    )
    sys.stdout.write(json.dumps({"results": results, "missing": missing}))


if __name__ == "__main__":
    _runner_main()
