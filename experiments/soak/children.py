"""The soak's processes: each started by name and command, SIGKILLed and
started again, its output logged; dying with the soak (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


class Child:
    """One process of the soak, by name and command; `kill()` SIGKILLs it
    and starts it again with the same command. Its output goes to
    `<run>/<name>.log` (every life appended) and, line by line, to
    `on_line(life, line)`."""

    def __init__(self, name: str, argv: list, run_dir: str, env: dict, on_line=None, stdin_pipe: bool = False,
                 restartable: bool = True):
        self.name, self.argv, self.env, self.on_line = name, argv, env, on_line
        self.restartable = restartable
        self.log_path = os.path.join(run_dir, f"{name}.log")
        self.stdin_pipe = stdin_pipe
        self.lives = 0
        self.kills = 0
        self.restarts = 0
        self.exits: list = []   # exits not caused here: (life, returncode, last lines)
        self.proc = None
        self._reader = None
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        self.lives += 1
        self.lines: list = []
        life = self.lives
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"==== {self.name} life {life}: {' '.join(self.argv)}\n")
        self.proc = subprocess.Popen(guarded(self.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                                     env=self.env, errors="replace")
        lines, proc = self.lines, self.proc

        def read():
            with open(self.log_path, "a", encoding="utf-8") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    lines.append(line)
                    if self.on_line is not None:
                        try:
                            self.on_line(life, line)
                        except Exception:  # a line it cannot read is in the log
                            pass

        self._reader = threading.Thread(target=read, name=f"soak-{self.name}-{life}", daemon=True)
        self._reader.start()

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            lines = self.lines
            for line in lines[seen:]:
                if text in line:
                    return line
            seen = len(lines)
            if self.proc.poll() is not None:
                self._reader.join(2)
                if len(self.lines) == seen:
                    break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not say {text!r} within {timeout_s:.0f} s; see {self.log_path}:\n"
                           + "".join(self.lines[-20:]))

    def kill(self) -> None:
        """SIGKILL, then the same command again at once."""
        with self._lock:
            if self.up:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(30)
            self._reader.join(5)
            self.kills += 1
            self.restarts += 1
            self.start()

    def check(self) -> bool:
        """If it exited by itself: record it (once), start it again if it
        may be; False then."""
        with self._lock:
            if self.up or (self.exits and self.exits[-1][0] == self.lives):
                return True
            self._reader.join(5)
            self.exits.append((self.lives, self.proc.returncode, "".join(self.lines[-15:])))
            if self.restartable:
                self.restarts += 1
                self.start()
            return False

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 30.0):
        """Stops it (sig, then SIGKILL after timeout_s); its return code, or
        None if it had to be killed."""
        with self._lock:
            if self.proc is None:
                return None
            rc = self.proc.poll()
            if rc is None:
                try:
                    if self.stdin_pipe and self.proc.stdin:
                        self.proc.stdin.close()
                except OSError:
                    pass
                self.proc.send_signal(sig)
                try:
                    rc = self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    rc = None
            if self._reader is not None:
                self._reader.join(5)
            return rc


# Run before a child's own program (Linux): it is SIGKILLed when the soak
# dies, however it dies (prctl PR_SET_PDEATHSIG survives the exec; it fires
# when the thread that started the child ends: soak() starts them all).
_ORPHAN_GUARD = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
                 "os.getppid() == {parent} or os._exit(1); os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def guarded(argv: list) -> list:
    """`argv` (a Python command) run so that it dies with this process."""
    if sys.platform.startswith("linux") and argv[:1] == [sys.executable]:
        return [sys.executable, "-c", _ORPHAN_GUARD.format(parent=os.getpid()), *argv[1:]]
    return argv


def monolith(*args) -> list:
    return [sys.executable, "-m", "monolith_jax.cli", *map(str, args)]


def sample_rss(children: dict, into: dict) -> None:
    """Each process's resident memory now (MB, Linux /proc): first and
    latest sample and the largest, over its lives."""
    for name, child in children.items():
        try:
            with open(f"/proc/{child.proc.pid}/status", encoding="ascii") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        mb = round(kb / 1024, 1)
        r = into.setdefault(name, {"first": mb, "max": mb})
        r["last"], r["max"] = mb, max(r["max"], mb)


def has_snapshot(folder: str) -> bool:
    """Whether the trainer has completed a snapshot there (Orbax names a finished one by its step)."""
    return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))
