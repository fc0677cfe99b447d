"""A rank notices when the launcher that started it is gone, and asks the training loop to stop.

``deepspeed run/train.py`` starts a runner, which starts DeepSpeed's ``launch.py``, which starts the ranks.
On a single node the runner has no signal handler: a SIGTERM to it ends it at once and leaves ``launch.py``
and the ranks running, still writing checkpoints and logs for a job nobody is waiting for. So each rank
records, when it starts, the chain of launcher processes above it (its parent and further ancestors, as long
as they are DeepSpeed, torchrun or ds-kdqat launchers), and a daemon thread checks once a second that they
all still exist. When one is gone, the listeners (the training loop's stop flag) are told, once: the rank
checkpoints at the end of the step and exits 143, as after a SIGTERM.

Without a launcher above it (``python run/train.py``) the chain is empty and no thread is started.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

import psutil

# Python modules whose ``python -m`` process is a launcher.
LAUNCHER_MODULES = frozenset({
    "deepspeed.launcher.runner", "deepspeed.launcher.launch",
    "torch.distributed.run", "torch.distributed.launch",
    "ds_kdqat.training.launch",
})
# Console scripts (or python scripts) whose process is a launcher, by file name.
LAUNCHER_SCRIPTS = frozenset({"deepspeed", "ds", "torchrun"})
# The console command whose ``launch`` subcommand is the wrapper.
CONSOLE_COMMAND = "ds-kdqat"
# The ds-kdqat wrapper run as a script: its path ends with these components.
WRAPPER_SCRIPT = ("run", "launch.py")

POLL_SECONDS = 1.0
MAX_CHAIN = 6


def _is_launcher_program(path: str) -> bool:
    parts = os.path.normpath(path).split(os.sep)
    return parts[-1] in LAUNCHER_SCRIPTS or tuple(parts[-2:]) == WRAPPER_SCRIPT


def _is_launch_subcommand(program: str, args: list[str]) -> bool:
    """``ds-kdqat launch …`` (the console command, or ``python -m ds_kdqat launch …``)."""
    return (program == "ds_kdqat" or os.path.basename(program) == CONSOLE_COMMAND) and args[:1] == ["launch"]


def is_launcher(cmdline: list[str]) -> bool:
    """Whether a process with this command line is a launcher: looks at the program, the interpreter's
    options and the script or module it runs (and a ``ds-kdqat`` subcommand), never at that script's own
    arguments."""
    if not cmdline:
        return False
    if _is_launcher_program(cmdline[0]) or _is_launch_subcommand(cmdline[0], cmdline[1:]):
        return True
    rest = cmdline[1:]
    for index, token in enumerate(rest):
        if token == "-m":
            module = rest[index + 1] if index + 1 < len(rest) else ""
            return module in LAUNCHER_MODULES or _is_launch_subcommand(module, rest[index + 2:])
        if not token.startswith("-"):
            # the script the interpreter runs
            return _is_launcher_program(token) or _is_launch_subcommand(token, rest[index + 1:])
    return False


def _describe(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:4])
    except psutil.Error:
        return "?"


def launcher_chain(pid: Optional[int] = None) -> list[psutil.Process]:
    """The launcher processes above ``pid`` (default: this process), nearest first; empty when its parent is
    not a launcher."""
    chain = []
    try:
        process = psutil.Process(pid or os.getpid()).parent()
        while process is not None and len(chain) < MAX_CHAIN and process.pid > 1:
            if not is_launcher(process.cmdline()):
                break
            chain.append(process)
            process = process.parent()
    except psutil.Error:
        pass
    return chain


def is_gone(process: psutil.Process) -> bool:
    """True when the process has exited (a zombie waiting to be reaped counts as exited) or its pid now
    belongs to another process."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class LauncherWatchdog:
    """Polls the recorded launcher chain; tells each listener once when a launcher is gone."""

    def __init__(self, chain: list[psutil.Process], poll_seconds: float = POLL_SECONDS):
        self.chain = chain
        self._names = {process.pid: _describe(process) for process in chain}
        self.poll_seconds = poll_seconds
        self.gone: Optional[str] = None  # what disappeared, once it has
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "LauncherWatchdog":
        if self.chain and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kdqat-launcher-watchdog", daemon=True)
            self._thread.start()
        return self

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` when a launcher is gone (at once if one already is); return an unsubscribe."""
        with self._lock:
            fired = self.gone is not None
            if not fired:
                self._listeners.append(listener)
        if fired:
            listener()

        def unsubscribe():
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def check(self) -> bool:
        """One poll: True (and the listeners told) when a recorded launcher is gone."""
        if self.gone is not None:
            return True
        for process in self.chain:
            if is_gone(process):
                self._fire(f"the launcher above this rank is gone (pid {process.pid}: {self._names[process.pid]})")
                return True
        return False

    def _fire(self, what: str) -> None:
        with self._lock:
            if self.gone is not None:
                return
            self.gone = what
            listeners, self._listeners = self._listeners, []
        try:
            print(f"ds-kdqat: {what}; stopping: checkpoint at the end of this step, then exit 143",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):  # the terminal went away with the launcher
            pass
        for listener in listeners:
            listener()

    def _run(self) -> None:
        while not self.check():
            time.sleep(self.poll_seconds)


_watchdog: Optional[LauncherWatchdog] = None
_watchdog_lock = threading.Lock()


def watch_launchers() -> LauncherWatchdog:
    """This process's watchdog, created (the launcher chain recorded) and started on the first call."""
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = LauncherWatchdog(launcher_chain()).start()
        return _watchdog


def on_launcher_gone(listener: Callable[[], None]) -> Callable[[], None]:
    """Subscribe ``listener`` to this process's watchdog (started if need be); return an unsubscribe."""
    return watch_launchers().subscribe(listener)
