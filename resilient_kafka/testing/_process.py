"""Child processes that never outlive the process that started them.

Brokers and S3 servers started by tests must not leak: a leaked Tansu keeps a port and memory
forever. Three layers cover the ways a parent can end:

* normal exit and ``sys.exit``: an ``atexit`` hook stops every live child;
* SIGTERM: turned into ``SystemExit`` (when nobody else handles it) so ``atexit`` runs;
* SIGKILL or a crash: on Linux the child is started through a tiny launcher that sets
  ``PR_SET_PDEATHSIG`` before ``exec``, so the kernel kills it with its parent.

Children run in their own session so that a Ctrl-C aimed at the terminal reaches only the
parent, which then shuts them down in order.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# Runs in the child before exec: ask the kernel for SIGKILL when the parent thread dies, and
# close the race where the parent died before the request was made. ``-S`` skips site imports.
_LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()
_hooks_installed = False


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes (Tansu colours its log even when it is not a tty)."""
    return _ANSI.sub("", text)


def tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` lines of ``text``, colour codes removed."""
    return "\n".join(strip_ansi(text).rstrip().splitlines()[-lines:])


class ManagedProcess:
    """A child process whose output goes to a log file and which is stopped at exit."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.log_path = Path(tempfile.mkstemp(prefix=f"rk-{name}-", suffix=".log", dir=log_dir)[1])
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        _install_hooks()
        argv = self.argv
        if (
            sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
        ):
            # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only the main thread
            # (which lives as long as the process) may use it; other threads rely on atexit.
            argv = [sys.executable, "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                close_fds=True,
            )
        with _live_lock:
            _live.add(self)

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_text(), lines)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no chance to flush or clean up."""
        self._signal(signal.SIGKILL)
        self._reap(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        if self.running():
            self._signal(signal.SIGTERM)
            try:
                self._reap(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._reap(timeout=10)
        self._reap(timeout=10)

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def _signal(self, sig: int) -> None:
        if self._popen is None or self._popen.poll() is not None:
            return
        try:
            os.killpg(self._popen.pid, sig)  # its own session: the group id is its pid
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - group already recycled
            self._popen.send_signal(sig)

    def _reap(self, timeout: float) -> None:
        if self._popen is None:
            return
        self._popen.wait(timeout)
        with _live_lock:
            _live.discard(self)


def live_processes() -> list[ManagedProcess]:
    """Children started here that have not been stopped yet (used by the leak check)."""
    with _live_lock:
        return [p for p in _live if p.running()]


def stop_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):  # exiting: best effort for every child
            proc.stop(timeout=3)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # pragma: no cover - embedded interpreters
            pass


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
