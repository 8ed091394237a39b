"""Runs untrusted generated Python against unit tests, outside the training process.

Design. ``run_tests`` starts one runner per batch (``python -I -S`` on this file, in a new session, in a
throwaway directory, with an environment holding only ``PATH``) and hands it the batch on stdin. The
runner forks one child per program, at most one per usable CPU at a time. Each child, before any
candidate code runs:

* points stdin, stdout and stderr at ``/dev/null`` and closes every other descriptor except its own
  result pipe and the directories it imports the standard library from;
* moves into its own empty directory and, when started as root, drops to ``nobody`` (uid/gid 65534, no
  supplementary groups): root ignores file permissions and ``RLIMIT_NPROC``, nobody does not;
* sets ``PR_SET_NO_NEW_PRIVS`` (set-user-ID binaries cannot give root back), ``PR_SET_DUMPABLE`` off
  (other programs cannot read or write its memory through ptrace or ``/proc``), ``PR_SET_PDEATHSIG``
  (it dies with the runner) and the limits: CPU seconds, address space, no new processes or threads,
  file size, open files, no core dumps.

Result channel. The runner creates a pipe and a random 16-byte nonce per child. The child writes the
nonce once when its sandbox is set up, then compiles the program and the tests, executes the program,
executes every test statement in the program's namespace and only then writes the nonce a second time.
The runner counts a pass iff it read exactly the nonce twice. Exit statuses and output are ignored, so
``os._exit(0)``, ``sys.exit(0)``, a crash, a timeout or printed "passed" text before the tests finish
score as failures; the tests are compiled, and ``exec``, ``os.write`` and ``os._exit`` bound, before the
program runs, so rebinding builtins or ``os`` attributes cannot skip the tests. A child that never wrote the
first nonce but reported an exception failed to set up (an environment fault, not a candidate's):
the runner reports it and ``run_tests`` raises ``RuntimeError`` instead of silently scoring zero.

Timeouts. The runner kills a child ``timeout_s`` after forking it (``RLIMIT_CPU`` backs this up); the
caller kills the runner's whole process group if the batch overruns its budget.

Standard library under a private install. The interpreter may live where nobody cannot enter (pyenv
under ``/root``, mode 700). The runner opens each ``sys.path`` directory as root; the child imports
through ``/proc/self/fd/<fd>``, a descriptor it holds, and so reads the standard library but no other
file that nobody could not read.

Residual risks. Not a security boundary against a deliberate attacker: a program that introspects the
interpreter (frames, ``gc``, ``ctypes``) can find its nonce and forge its own pass, and one that
rebinds names the tests use or returns an object equal to everything passes weak asserts. It cannot
forge another program's result: the other pipes are closed in it and the other children's memory is
out of its reach. Programs run as nobody can read world-readable files, write to world-writable
directories such as ``/tmp`` (1 MiB per file), open network sockets and signal other processes of
nobody (they can make a sibling fail, never pass). Started as a non-root user, programs run as that
user and can modify whatever it can (and, without Yama's ptrace restriction, attach to the training
process). There is no seccomp filter, no namespace and no network isolation.

Speed: 64 trivial programs score in 0.2 s on the 2-core development machine when it is quiet, and in
0.38-0.56 s (median 0.49 s over 30 batches) while other jobs held its load average near 5; a single
program takes about 60 ms, mostly the runner's interpreter start and imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
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


def run_tests(
    programs: Sequence[str], tests: Sequence[Sequence[str]], timeout_s: float = 2.0, memory_mb: int = 512
) -> list[bool]:
    r"""Executes each program with its unit tests in a sandbox and reports which pass.

    All programs of a call share one runner subprocess, but each runs in its own forked child with its
    own limits, so nothing one program does can change another's result.

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
    payload = {
        "programs": list(programs),
        "tests": [list(t) for t in tests],
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
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
    return [bool(passed) for passed in json.loads(out)]


def _worker_count(n: int) -> int:
    return max(1, min(n, len(os.sched_getaffinity(0))))


@dataclass
class _Child:
    pid: int
    fd: int
    nonce: bytes
    deadline: float
    index: int
    data: bytes = b""


def _run_batch(programs: list[str], tests: list[list[str]], timeout_s: float, memory_mb: int) -> list[bool]:
    """Runner side: forks a sandboxed child per program and collects the verdicts from their pipes."""
    drop_privileges = os.geteuid() == 0
    import_fds = _open_import_dirs() if drop_privileges else {}
    for i in range(len(programs)):
        os.mkdir(str(i), 0o700)
        if drop_privileges:
            os.chown(str(i), _NOBODY, _NOBODY)
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
                child = _fork_child(next_index, programs, tests, timeout_s, memory_mb, import_fds)
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
    return results


def _open_import_dirs() -> dict[str, int]:
    """Opens each importable ``sys.path`` directory while still root, so the child can import through it."""
    fds = {}
    for path in sys.path:
        try:
            fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
    return fds


def _fork_child(
    index: int,
    programs: list[str],
    tests: list[list[str]],
    timeout_s: float,
    memory_mb: int,
    import_fds: dict[str, int],
) -> _Child:
    nonce = os.urandom(_NONCE_BYTES)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:  # the child must never return into the runner's loop, whatever the program raised or rebound
            _child_main(programs[index], tests[index], nonce, write_fd, str(index), timeout_s, memory_mb, import_fds)
        finally:
            os._exit(1)
    os.close(write_fd)
    return _Child(pid=pid, fd=read_fd, nonce=nonce, deadline=time.monotonic() + timeout_s, index=index)


def _child_main(
    program: str,
    tests: list[str],
    nonce: bytes,
    result_fd: int,
    workdir: str,
    timeout_s: float,
    memory_mb: int,
    import_fds: dict[str, int],
) -> NoReturn:
    # Bound before the program runs: it may rebind builtins.exec, os.write or os._exit.
    run, write, exit_ = exec, os.write, os._exit
    try:
        _enter_sandbox(result_fd, workdir, timeout_s, memory_mb, import_fds)
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


def _enter_sandbox(result_fd: int, workdir: str, timeout_s: float, memory_mb: int, import_fds: dict[str, int]) -> None:
    """Isolates the current (forked) process; see the module docstring for what each step prevents."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    keep = {0, 1, 2, result_fd, *import_fds.values()}
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
        _import_through(import_fds)
    libc = ctypes.CDLL(None, use_errno=True)
    for option, value in ((_PR_SET_NO_NEW_PRIVS, 1), (_PR_SET_DUMPABLE, 0), (_PR_SET_PDEATHSIG, signal.SIGKILL)):
        if libc.prctl(option, value, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl({option}) failed")
    cpu_s = math.ceil(timeout_s)
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
        (resource.RLIMIT_NPROC, (0, 0)),
        (resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT)),
        (resource.RLIMIT_NOFILE, (_OPEN_FILES_LIMIT, _OPEN_FILES_LIMIT)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20)),
    ):
        resource.setrlimit(limit, value)


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
    results = _run_batch(request["programs"], request["tests"], request["timeout_s"], request["memory_mb"])
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    _runner_main()
