import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from hft_lightning import sandbox
from hft_lightning.sandbox import namespaces_unavailable, run_tests

ADD_3 = "def add_3(x):\n    return x + 3"
ADD_3_TESTS = ["assert add_3(1) == 4", "assert add_3(-3) == 0"]
# Short timeout for the tests that wait for one: the behaviour is the same, the suite is faster.
FAST_TIMEOUT_S = 1.0
REPO_ROOT = Path(__file__).resolve().parents[1]
# Outside /tmp, which programs in namespaces see as their own empty tmpfs: a place both isolations can reach.
SHARED_TMP = Path("/var/tmp")
NAMESPACES_MISSING = namespaces_unavailable()
needs_namespaces = pytest.mark.skipif(
    NAMESPACES_MISSING is not None, reason=f"the kernel refuses the sandbox's namespaces here: {NAMESPACES_MISSING}"
)


@pytest.fixture(
    params=[
        pytest.param(True, id="namespaces", marks=needs_namespaces),
        pytest.param(False, id="basic", marks=pytest.mark.filterwarnings("ignore:code sandbox without")),
    ]
)
def namespaces(request, monkeypatch) -> bool:
    """Runs the test with the per-program namespaces, then with the fallback forced on."""
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", request.param)
    return request.param


def program(body: str) -> str:
    """A program that does ``body`` at import time, then defines a correct ``add_3``."""
    return textwrap.dedent(body).strip() + "\n" + ADD_3


def raises(statement: str, error: str) -> str:
    """A test statement that passes iff ``statement`` raises ``error`` in the program."""
    return f"try:\n    {statement}\nexcept {error}:\n    pass\nelse:\n    raise AssertionError({statement!r})"


def test_correct_program_passes():
    assert run_tests([ADD_3], [ADD_3_TESTS]) == [True]


def test_empty_batch_returns_empty_list():
    assert run_tests([], []) == []


def test_program_without_tests_passes_when_it_runs():
    assert run_tests([ADD_3, "1 / 0"], [[], []]) == [True, False]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("def add_3(x):\n    return x + 2", id="wrong-answer"),
        pytest.param("def add_3(x)\n    return x + 3", id="syntax-error"),
        pytest.param("def add_3(x):\n    raise ValueError(x)", id="exception-in-function"),
        pytest.param(program("raise RuntimeError('at import')"), id="exception-at-import"),
        pytest.param("def add_3(x):\n    return add_3(x)", id="infinite-recursion"),
        pytest.param(program("import ctypes\nctypes.string_at(0)"), id="segfault"),
    ],
)
def test_failing_programs_fail(source):
    assert run_tests([source], [ADD_3_TESTS]) == [False]


def test_stdlib_imports_work_in_the_sandbox(namespaces):
    source = program(
        """
        import collections, datetime, fractions, hashlib, heapq, itertools, json, math, re, statistics, zlib
        assert datetime.datetime.strptime("2024", "%Y").year == 2024
        assert "é".encode("cp1252") == b"\\xe9"
        assert statistics.mean([1, 2]) == fractions.Fraction(3, 2)
        assert hashlib.sha256(b"").hexdigest().startswith("e3b0c442")
        assert math.comb(5, 2) == 10 and zlib.crc32(b"a") == 0xE8B7BE43
        """
    )
    assert run_tests([source], [ADD_3_TESTS]) == [True]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("while True:\n    pass", id="busy-loop"),
        pytest.param("import time\ntime.sleep(1000)", id="sleep"),
        pytest.param("while True:\n    print('1 passed')", id="stdout-spam"),
        pytest.param("def add_3(x):\n    while True:\n        x += 3", id="loop-in-function"),
    ],
)
def test_infinite_loop_times_out_and_the_batch_continues(source):
    batch = [ADD_3, source, "def add_3(x):\n    return x", ADD_3]
    assert run_tests(batch, [ADD_3_TESTS] * 4, timeout_s=FAST_TIMEOUT_S) == [True, False, False, True]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("import os\nos._exit(0)", id="os._exit"),
        pytest.param("import sys\nsys.exit(0)", id="sys.exit"),
        pytest.param("raise SystemExit", id="SystemExit"),
        pytest.param("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", id="self-kill"),
        pytest.param("print('4 passed in 0.01s')\nprint('OK')\nimport sys\nsys.exit(0)", id="fake-pass-output"),
        # Blind writes to every descriptor reach the result pipe but cannot know its nonce.
        pytest.param(
            "import os\nfor fd in range(64):\n    try:\n        os.write(fd, bytes(32))\n    except OSError:\n"
            "        pass\nos._exit(0)",
            id="write-all-fds",
        ),
        # Skipping the tests by rebinding what a naive runner would call.
        pytest.param("import builtins\nbuiltins.exec = lambda *a: None\nbuiltins.compile = None", id="rebind-exec"),
        pytest.param("import os\nos._exit = lambda code: None\nos.write = lambda fd, b: len(b)", id="rebind-os"),
    ],
)
def test_forged_results_fail(body):
    # The function is wrong, so only a forged result could make it pass.
    source = textwrap.dedent(body).strip() + "\ndef add_3(x):\n    return 0"
    assert run_tests([source], [ADD_3_TESTS]) == [False]


def test_exit_before_tests_fails_even_with_a_correct_function():
    exits = ["import os\nos._exit(0)", "import sys\nsys.exit(0)"]
    assert run_tests([ADD_3 + "\n" + e for e in exits], [ADD_3_TESTS] * 2) == [False, False]


def test_tampering_with_builtins_fails_and_does_not_affect_other_programs():
    tamper = textwrap.dedent(
        """
        import builtins, os
        builtins.AssertionError = type("Quiet", (Exception,), {})
        builtins.len = lambda obj: 0
        builtins.exec = lambda *args, **kwargs: None
        os._exit = lambda code: None
        def add_3(x):
            return 0
        """
    )
    others = [
        "def size(xs):\n    return len(xs)",
        "def size(xs):\n    return 0",
    ]
    size_tests = ["assert size([1, 2, 3]) == 3"]
    results = run_tests([tamper, *others], [ADD_3_TESTS, size_tests, size_tests])
    assert results == [False, True, False]


def test_program_holds_no_pipe_but_its_own():
    # Started while the slow program runs, the counter would inherit that program's result pipe if the
    # sandbox did not close it; the only pipe it may hold is the one it reports its own verdict on.
    slow = ADD_3 + "\nimport time\ntime.sleep(0.3)"
    count_pipes = textwrap.dedent(
        """
        import os, stat
        def pipes():
            fds = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
            return sum(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in fds if os.path.exists(f"/proc/self/fd/{fd}"))
        """
    )
    results = run_tests([slow, count_pipes, slow], [ADD_3_TESTS, ["assert pipes() == 1"], ADD_3_TESTS])
    assert results == [True, True, True]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two programs running at once")
def test_program_cannot_open_a_running_siblings_memory(namespaces):
    sibling = ADD_3 + "\nimport time\ntime.sleep(0.5)"
    spy = textwrap.dedent(
        """
        import os, time
        def probe():
            time.sleep(0.1)
            found, opened = 0, []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    status = open(f"/proc/{pid}/status").read()
                except OSError:
                    continue
                if int(pid) == os.getpid() or f"Uid:\\t{os.getuid()}\\t" not in status:
                    continue
                found += 1
                for name in ("mem", "environ"):
                    try:
                        open(f"/proc/{pid}/{name}", "rb").read(1)
                        opened.append(name)
                    except OSError:
                        pass
            return found, opened
        """
    )
    # Without namespaces the sibling is there but its memory is out of reach; with them it is out of sight.
    found = "found == 0" if namespaces else "found >= 1"
    spy_tests = ["found, opened = probe()", f"assert {found}", "assert opened == []"]
    assert run_tests([sibling, spy], [ADD_3_TESTS, spy_tests]) == [True, True]


def test_environment_is_clean_and_unprivileged(namespaces, monkeypatch):
    monkeypatch.setenv("HFT_SANDBOX_SECRET", "leaked")
    checks = [
        "import os, sys",
        "assert 'HFT_SANDBOX_SECRET' not in os.environ",
        "assert set(os.environ) <= {'PATH', 'LC_CTYPE'}",
        f"assert not os.getcwd().startswith({str(REPO_ROOT)!r})",
        "assert os.listdir('.') == []",
        "assert sys.stdin.read() == ''",
        "assert 'NoNewPrivs:\\t1' in open('/proc/self/status').read()",
        "assert os.geteuid() != 0",
    ]
    if os.geteuid() != 0:
        checks.pop()
    assert run_tests([ADD_3], [checks]) == [True]


@pytest.fixture
def repo_file() -> Iterator[Path]:
    """A file in a world-readable directory owned by the test's user, like a repository checkout."""
    directory = Path(tempfile.mkdtemp(prefix="hft-sandbox-repo-", dir=SHARED_TMP))
    directory.chmod(0o755)
    path = directory / "module.py"
    path.write_text("precious = True\n")
    path.chmod(0o644)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    "attack",
    [
        "os.remove({path!r})",
        "open({path!r}, 'w').close()",
        "shutil.rmtree(os.path.dirname({path!r}))",
        "os.chmod({path!r}, 0o777)",
    ],
    ids=["remove", "truncate", "rmtree", "chmod"],
)
def test_files_outside_the_sandbox_cannot_be_changed(namespaces, repo_file, attack):
    if not namespaces and os.geteuid() != 0:
        pytest.skip("without namespaces programs keep the caller's rights unless started as root")
    source = program("import os, shutil\n" + attack.format(path=str(repo_file)))
    assert run_tests([source], [ADD_3_TESTS]) == [False]
    assert repo_file.read_text() == "precious = True\n"
    assert repo_file.stat().st_mode & 0o777 == 0o644


def processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # the process exited while we looked
            continue
    return pids


@pytest.mark.parametrize(
    "spawn",
    [
        # Bounded on purpose: if the sandbox leaked, at most 200 sleeping processes for a few seconds.
        "for _ in range(200):\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', MARKER])",
        "subprocess.Popen(['/bin/sleep', MARKER])",
        "threading.Thread(target=time.sleep, args=(float(MARKER),)).start()",
    ],
    ids=["fork-loop", "subprocess", "thread"],
)
def test_new_processes_fail_and_none_are_left_behind(spawn):
    marker = f"{random.Random(0).uniform(5, 6):.6f}"  # a sleep length nobody else uses
    source = program(f"import os, subprocess, threading, time\nMARKER = {marker!r}\n{spawn}")
    try:
        assert run_tests([source, ADD_3], [ADD_3_TESTS] * 2) == [False, True]
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "body",
    [
        "data = bytearray(10**11)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
        "s = 'x'\nwhile True:\n    s += s",
    ],
    ids=["one-huge-block", "growing-list", "doubling-string"],
)
def test_huge_allocation_fails_and_the_batch_continues(body):
    results = run_tests([program(body), ADD_3], [ADD_3_TESTS] * 2, timeout_s=FAST_TIMEOUT_S, memory_mb=256)
    assert results == [False, True]


def test_memory_limit_is_enforced():
    checks = ["try:\n    bytearray(300 << 20)\nexcept MemoryError:\n    pass\nelse:\n    raise AssertionError"]
    assert run_tests([ADD_3], [checks], memory_mb=256) == [True]


def test_timeout_before_setup_scores_false_without_raising():
    slow = program("import time\ntime.sleep(0.5)")
    assert run_tests([slow] * 4, [ADD_3_TESTS] * 4, timeout_s=0.01) == [False] * 4


def test_programs_killed_at_their_timeout_leave_no_process_behind():
    # Timeouts around the time setup takes: the runner kills a child before, while and after it enters namespaces.
    slow = "import time\ntime.sleep(30)"
    for timeout_s in (0.001, 0.003, 0.01, 0.03):
        assert run_tests([slow] * 4, [[]] * 4, timeout_s=timeout_s) == [False] * 4
    deadline = time.monotonic() + 5.0  # killed processes take a moment to go
    while processes_with(sandbox.__file__) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(sandbox.__file__) == []


def test_big_output_file_fails():
    source = program("with open('out.bin', 'wb') as f:\n    f.write(bytes(10**8))")
    assert run_tests([source], [ADD_3_TESTS]) == [False]


def test_batch_of_64_keeps_order(namespaces):
    rng = random.Random(0)
    wrong = [rng.random() < 0.3 for _ in range(64)]
    programs = [f"def add_{k}(x):\n    return x + {k + w}" for k, w in enumerate(wrong)]
    tests = [[f"assert add_{k}(1) == {k + 1}", f"assert add_{k}(-3) == {k - 3}"] for k in range(64)]
    assert run_tests(programs, tests) == [not w for w in wrong]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"programs": [ADD_3], "tests": []}, "programs and tests"),
        ({"programs": [ADD_3], "tests": ["assert add_3(1) == 4"]}, r"tests\[0\]"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"timeout_s": math.inf}, "timeout_s"),
        ({"timeout_s": math.nan}, "timeout_s"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"memory_mb": 256.5}, "memory_mb"),
    ],
)
def test_invalid_arguments_raise(kwargs, argument):
    call = {"programs": [ADD_3], "tests": [ADD_3_TESTS], **kwargs}
    with pytest.raises(ValueError, match=argument):
        run_tests(**call)


@pytest.fixture
def listener(request) -> Iterator[tuple[socket.socket, object]]:
    """A socket listening on loopback TCP, an abstract Unix address or a Unix socket file in /run, and its address.

    The file stands for a system service's socket, like Docker's: writable by everyone here, so only its
    absence from the program's view keeps the program out.
    """
    name = f"hft-sandbox-test-{os.getpid()}"
    if request.param == "tcp":
        server = socket.create_server(("127.0.0.1", 0))
    else:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if request.param == "abstract-unix":
            server.bind(f"\0{name}")
        elif os.access("/run", os.W_OK):
            server.bind(f"/run/{name}.sock")
            os.chmod(f"/run/{name}.sock", 0o666)
        else:
            pytest.skip("needs a writable /run to place a service's socket in")
        server.listen()
    server.setblocking(False)
    yield server, server.getsockname()
    server.close()
    if request.param == "run-unix":
        os.remove(f"/run/{name}.sock")


@pytest.mark.parametrize("listener", ["tcp", "abstract-unix", "run-unix"], indirect=True)
def test_network_is_unreachable_in_namespaces(namespaces, listener):
    server, address = listener
    family = "AF_INET" if server.family == socket.AF_INET else "AF_UNIX"
    connect = f"import socket\nsocket.socket(socket.{family}, socket.SOCK_STREAM).connect({address!r})"
    # Without namespaces the program reaches the listener: the forced fallback is really the old isolation.
    assert run_tests([program(connect)], [ADD_3_TESTS]) == [not namespaces]
    if namespaces:
        with pytest.raises(BlockingIOError):
            server.accept()
    else:
        server.accept()[0].close()


@needs_namespaces
def test_tmp_is_private_empty_and_writable():
    name = f"hft-sandbox-test-{os.getpid()}"
    checks = [
        "import os",
        "assert os.getcwd() == '/tmp' and os.listdir('/tmp') == [] and os.listdir('/dev/shm') == []",
        "assert os.listdir('/run') == []",
        f"open('/tmp/{name}', 'w').write('x')",
        f"open('/dev/shm/{name}', 'w').write('x')",
        "open('in-cwd.txt', 'w').write('x')",
        f"assert set(os.listdir('/tmp')) == {{'in-cwd.txt', {name!r}}}",
    ]
    assert run_tests([ADD_3], [checks]) == [True]
    assert not (Path("/tmp") / name).exists()
    assert not (Path("/dev/shm") / name).exists()


@needs_namespaces
def test_world_writable_directories_are_read_only():
    directory = Path(tempfile.mkdtemp(prefix="hft-sandbox-writable-", dir=SHARED_TMP))
    try:
        directory.chmod(0o777)
        source = program(f"open({str(directory / 'dropped.txt')!r}, 'w').close()")
        assert run_tests([source], [ADD_3_TESTS]) == [False]
        assert list(directory.iterdir()) == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@needs_namespaces
def test_processes_outside_are_invisible_and_out_of_reach():
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        checks = [
            "import os",
            "assert [pid for pid in os.listdir('/proc') if pid.isdigit()] == [str(os.getpid())]",
            raises(f"os.kill({outsider.pid}, 9)", "ProcessLookupError"),
        ]
        assert run_tests([ADD_3], [checks]) == [True]
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


@needs_namespaces
def test_program_cannot_undo_its_mounts():
    checks = [
        "import ctypes",
        "libc = ctypes.CDLL(None)",
        "assert libc.mount(None, b'/', None, 0x20 | 0x1000, None) == -1",  # MS_REMOUNT | MS_BIND: read-write
        "assert libc.umount2(b'/tmp', 0) == -1",
        "assert libc.umount2(b'/proc', 2) == -1",  # MNT_DETACH
    ]
    assert run_tests([ADD_3], [checks]) == [True]


@needs_namespaces
def test_first_call_logs_the_isolation_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_reported", set())
    with caplog.at_level(logging.INFO, logger="hft_lightning.sandbox"):
        run_tests([ADD_3], [ADD_3_TESTS])
        run_tests([ADD_3], [ADD_3_TESTS])
    assert [r.getMessage() for r in caplog.records] == [
        "code sandbox: every program runs in its own mount, PID and IPC namespaces, without network"
    ]


def test_fallback_warns_once_naming_what_is_missing(monkeypatch):
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", False)
    monkeypatch.setattr(sandbox, "_reported", set())
    with pytest.warns(RuntimeWarning, match=r"without Linux namespaces \(turned off\).*network.*/tmp.*signal"):
        assert run_tests([ADD_3, "def add_3(x):\n    return x"], [ADD_3_TESTS] * 2) == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_tests([ADD_3], [ADD_3_TESTS]) == [True]


# A script run as uid 1000 in a user namespace the test creates: the sandbox sees a caller that is not root.
AS_USER_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
programs, tests = json.loads(sys.argv[2])
print(json.dumps([sandbox.namespaces_unavailable(), sandbox.run_tests(programs, tests)]))
"""


@needs_namespaces
def test_caller_that_is_not_root_gets_namespaces_through_a_user_namespace(repo_file):
    if os.geteuid() != 0:
        pytest.skip("the caller is not root: every namespace test above already went through a user namespace")
    as_user = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
    probe = subprocess.run([*as_user, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot run the test as a user that is not root: {probe.stderr.strip()}")
    # The caller owns repo_file (uid 1000 here is root outside): only the read-only mounts protect it.
    checks = [
        "import os, socket",
        "assert os.geteuid() == 1000 and os.listdir('/tmp') == []",
        "assert [pid for pid in os.listdir('/proc') if pid.isdigit()] == [str(os.getpid())]",
        f"assert not os.access({str(repo_file)!r}, os.W_OK)",
        raises("socket.create_connection(('127.0.0.1', 9), timeout=1)", "OSError"),
        "import ctypes",
        "assert ctypes.CDLL(None).mount(None, b'/', None, 0x20 | 0x1000, None) == -1",
    ]
    batch = json.dumps([[ADD_3], [checks]])
    out = subprocess.run(
        [*as_user, sys.executable, "-c", AS_USER_SCRIPT, sandbox.__file__, batch],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == [None, [True]]
    assert repo_file.read_text() == "precious = True\n"
