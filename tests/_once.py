"""Scripts the suite runs once per pytest session, in the background, however many xdist
workers share the session.

A script's tests (the deviceless GPU/TPU compiles of ``tests/test_accelerators.py``, which
need the accelerator environment's python; optax's own test file run against jbce by
``tests/test_optax_suite.py``) read one JSON result; run per worker, the script
would run once on each of them. Instead the first worker that collects a test needing it
starts it (:func:`start`), detached from that worker, and every test that needs the result
waits for it (:func:`result`). Meanwhile the
workers run the other tests. The session's directory (:data:`RUN_DIR`, made by the xdist
controller or the single pytest process and inherited through the environment) holds one
``<name>.started`` claim, the script's stdout and stderr and, when it has ended, its exit
status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_DIR = "JBCE_TEST_RUN_DIR"

# Runs the script, then writes its exit status ("timeout" past the limit) atomically.
_RUNNER = """
import pathlib, subprocess, sys
d, name, limit, argv = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4:]
with open(d / f"{name}.stdout", "w") as out, open(d / f"{name}.stderr", "w") as err:
    try:
        rc = str(subprocess.run(argv, stdout=out, stderr=err, timeout=limit).returncode)
    except subprocess.TimeoutExpired:
        rc = "timeout"
(d / f"{name}.rc.tmp").write_text(rc)
(d / f"{name}.rc.tmp").rename(d / f"{name}.rc")
"""


def _dir() -> Path:
    # Set by tests/conftest.py; a process without it gets a directory of its own.
    if RUN_DIR not in os.environ:
        os.environ[RUN_DIR] = tempfile.mkdtemp(prefix="jbce-tests-")
    return Path(os.environ[RUN_DIR])


def start(name: str, argv: list[str], *, env: dict, cwd: Path, limit: float) -> None:
    """Starts ``argv`` as ``name`` unless a worker of this session already has."""
    d = _dir()
    try:
        fd = os.open(d / f"{name}.started", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(d), name, str(limit), *argv],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives the worker that started it; stop() ends it
    )
    os.write(fd, str(proc.pid).encode())
    os.close(fd)


def result(name: str, *, limit: float) -> dict:
    """The JSON object on the last stdout line of ``name``, once it has ended (waiting up
    to ``limit`` seconds); fails the calling test with its stderr if it did not succeed."""
    import pytest

    d = _dir()
    rc_file = d / f"{name}.rc"
    deadline = time.monotonic() + limit
    while not rc_file.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not finish within {limit:.0f} s")
        time.sleep(0.5)
    rc = rc_file.read_text()
    if rc != "0":
        err = (d / f"{name}.stderr").read_text()
        pytest.fail(f"{name} exited with {rc}:\n{err[-5000:]}")
    return json.loads((d / f"{name}.stdout").read_text().strip().splitlines()[-1])


def stop() -> None:
    """Ends the scripts of this session that are still running (the session is over)."""
    d = _dir()
    for claim in d.glob("*.started"):
        if (d / claim.name.replace(".started", ".rc")).exists():
            continue
        try:
            os.killpg(int(claim.read_text()), signal.SIGTERM)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
