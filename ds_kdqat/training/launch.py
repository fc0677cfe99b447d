"""Run DeepSpeed's launcher so that SIGTERM and Ctrl-C stop training the documented way.

    python run/launch.py [deepspeed launcher args] run/train.py --ds_config X [train.py args]
    python -m ds_kdqat.training.launch --num_accelerators 2 run/train.py --ds_config X

What plain ``deepspeed`` does on a signal does not fit resumable training: on a single node the runner has
no handler (a SIGTERM ends it and leaves the ranks running), and DeepSpeed's ``launch.py`` answers SIGINT
or SIGTERM by terminating the ranks, SIGKILLing them 30 s later and exiting 1. This wrapper runs the runner
(``python -m deepspeed.launcher.runner``, this interpreter) in a session of its own, so a terminal's Ctrl-C
reaches only the wrapper, and on SIGTERM or SIGINT:

1. sends SIGTERM to the training ranks alone (the processes running the user script among its
   descendants), which checkpoint at the end of the step and exit 143; ``launch.py`` then ends the job;
2. a second signal sends SIGTERM to every process of the tree; a third, SIGKILL;
3. waits, without a time limit (unless ``KDQAT_STOP_TIMEOUT`` seconds are set: each period without the
   tree ending escalates one step), until no process of the tree is left, and exits 143.

Without a signal it exits with the runner's exit status. Signals that arrive within
:data:`DUPLICATE_SECONDS` of the previous one count as one request (under SLURM every process of the step
gets the signal, and the node script forwards it as well).

When ``--master_port`` is not given, the job is local (no hostfile) and the default port 29500 is taken on
this machine, a free port is chosen and passed to the runner, and one line says so.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil

from .distributed import free_port
from .watchdog import is_gone, is_launcher

DEFAULT_PORT = 29500
DEFAULT_HOSTFILE = "/job/hostfile"  # the runner's default
POLL_SECONDS = 0.2
DUPLICATE_SECONDS = 2.0
STOP_STATUS = 143
PREFIX = "ds-kdqat launch:"

# The runner's options (DeepSpeed 0.19): those that take no value, and those that take one (an option not
# listed is taken to need a value).
RUNNER_FLAGS = ("--module", "--no_python", "--no_local_rank", "--no_ssh", "--no_ssh_check", "--force_multi",
                "--save_pid", "--bind_cores_to_rank", "--quiet", "-q")
RUNNER_VALUE_OPTIONS = ("--hostfile", "--include", "--exclude", "--num_nodes", "--num_gpus", "--num_accelerators",
                        "--master_port", "--master_addr", "--node_rank", "--launcher", "--launcher_args",
                        "--enable_each_rank_log", "--autotuning", "--bind_core_list", "--ssh_port",
                        "--venv_script", "--log_level")
SHORT_OPTIONS = {"-H": "--hostfile", "-i": "--include", "-e": "--exclude"}


@dataclass
class LaunchArgs:
    """A command line split into the runner's options, the user script and the script's arguments."""

    launcher_args: list[str]
    script: str
    script_args: list[str]
    options: dict = field(default_factory=dict)  # canonical long name -> value (True for flags)


def _canonical(name: str) -> str:
    """The runner option a (possibly abbreviated, as argparse allows) option name stands for."""
    name = SHORT_OPTIONS.get(name, name)
    known = RUNNER_FLAGS + RUNNER_VALUE_OPTIONS
    if name in known or not name.startswith("--"):
        return name
    matches = [option for option in known if option.startswith(name)]
    return matches[0] if len(matches) == 1 else name


def split_args(argv: list[str]) -> LaunchArgs:
    """Split ``[runner options] script [script args]``; ValueError when there is no script."""
    options, index = {}, 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("-") or token == "-":
            return LaunchArgs(argv[:index], token, argv[index + 1:], options)
        if "=" in token:
            name, value = token.split("=", 1)
            options[_canonical(name)] = value
            index += 1
        elif _canonical(token) in RUNNER_FLAGS:
            options[_canonical(token)] = True
            index += 1
        else:
            if index + 1 >= len(argv):
                raise ValueError(f"the launcher option {token} needs a value")
            options[_canonical(token)] = argv[index + 1]
            index += 2
    raise ValueError("no training script given (usage: launch.py [deepspeed launcher options] "
                     "run/train.py --ds_config CONFIG ...)")


def port_in_use(port: int) -> bool:
    """Whether a process on this machine listens on ``port`` (bound the way torch's TCPStore binds it:
    all addresses, address reuse on, so a connection in TIME_WAIT does not count)."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # the family is not available here
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as error:
                if error.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                    return True
    return False


def choose_master_port(args: LaunchArgs, default: int = DEFAULT_PORT) -> Optional[int]:
    """The port to pass as ``--master_port``, or None to leave the runner's choice alone: only a local job
    (no hostfile) without ``--master_port`` whose default port is taken gets another one."""
    if "--master_port" in args.options:
        return None
    if os.path.isfile(str(args.options.get("--hostfile", DEFAULT_HOSTFILE))):
        return None  # multi-node: the master is the hostfile's first node, not necessarily this one
    if not port_in_use(default):
        return None
    return free_port()


def runner_command(args: LaunchArgs, port: Optional[int]) -> list[str]:
    extra = ["--master_port", str(port)] if port is not None else []
    return [sys.executable, "-m", "deepspeed.launcher.runner", *args.launcher_args, *extra, args.script,
            *args.script_args]


class ProcessTree:
    """The runner and everything below it, remembered as it is seen (so a process whose parent died is
    still known), and the training ranks among them."""

    def __init__(self, root: psutil.Process, script: str):
        self.root = root
        self.members: dict[int, psutil.Process] = {root.pid: root}
        self.script = script
        self.script_path = os.path.realpath(script)

    def refresh(self) -> None:
        """Add the current descendants of every known, living member."""
        for process in list(self.members.values()):
            if is_gone(process):
                continue
            try:
                for child in process.children(recursive=True):
                    self.members.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.members.values() if not is_gone(p)]

    def _runs_script(self, process: psutil.Process) -> bool:
        try:
            cmdline = process.cmdline()
            if not cmdline or is_launcher(cmdline):
                return False
            cwd = process.cwd()
        except psutil.Error:
            return False
        for token in cmdline[:4]:
            if token == self.script or os.path.realpath(os.path.join(cwd, token)) == self.script_path:
                return True
        return False

    def ranks(self) -> list[psutil.Process]:
        """Living processes that run the user script and whose parent does not (forked workers of a rank
        run the same command line)."""
        found = []
        for process in self.alive():
            if not self._runs_script(process):
                continue
            try:
                parent = process.parent()
            except psutil.Error:
                parent = None
            if parent is not None and parent.pid in self.members and self._runs_script(parent):
                continue
            found.append(process)
        return found


def _send(processes, sig: int) -> None:
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.Error:
            pass


def _stop_timeout() -> Optional[float]:
    value = os.environ.get("KDQAT_STOP_TIMEOUT", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise SystemExit(f"{PREFIX} KDQAT_STOP_TIMEOUT must be a number of seconds, got {value!r}")
    return seconds if seconds > 0 else None


class Supervisor:
    """Runs the runner and turns stop signals into the three escalation levels of the module doc."""

    def __init__(self, command: list[str], script: str):
        self.command = command
        self.script = script
        self.requests = 0  # stop requests counted by the signal handler
        self.level = 0  # escalation level acted upon
        self.signalled_ranks: set[int] = set()
        self._last_signal = -float("inf")
        self._level_since = 0.0
        self.timeout = _stop_timeout()

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if now - self._last_signal >= DUPLICATE_SECONDS:
            self.requests += 1
        self._last_signal = now

    def _say(self, message: str) -> None:
        try:
            print(f"{PREFIX} {message}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def _escalate(self, tree: ProcessTree, level: int) -> None:
        self.level, self._level_since = level, time.monotonic()
        if level == 1:
            self._say("stop requested: the ranks checkpoint at the end of the step and exit 143 "
                      "(signal again to terminate every process, a third time to kill them)")
        elif level == 2:
            self._say("terminating every process of the job (SIGTERM)")
            self._signal_tree(tree, signal.SIGTERM)
        else:
            self._say("killing every process of the job (SIGKILL)")
            self._signal_tree(tree, signal.SIGKILL)

    def _signal_tree(self, tree: ProcessTree, sig: int) -> None:
        _send(tree.alive(), sig)
        try:  # members not seen yet: the runner's session is its own process group
            os.killpg(tree.root.pid, sig)
        except OSError:
            pass

    def _deliver_to_ranks(self, tree: ProcessTree) -> None:
        """Level 1: SIGTERM to each rank once, including ranks that start after the request."""
        new = [rank for rank in tree.ranks() if rank.pid not in self.signalled_ranks]
        _send(new, signal.SIGTERM)
        self.signalled_ranks.update(rank.pid for rank in new)

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            child = subprocess.Popen(self.command, start_new_session=True)
            tree = ProcessTree(psutil.Process(child.pid), self.script)
            while True:
                if child.poll() is None:
                    tree.refresh()
                wanted = min(self.requests, 3)
                if (self.timeout is not None and 0 < self.level < 3
                        and time.monotonic() - self._level_since >= self.timeout):
                    wanted = max(wanted, self.level + 1)
                while self.level < wanted:
                    self._escalate(tree, self.level + 1)
                if self.level == 1:
                    self._deliver_to_ranks(tree)
                if child.poll() is not None and not tree.alive():
                    break
                time.sleep(POLL_SECONDS)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.requests:
            return STOP_STATUS
        code = child.returncode
        return 128 - code if code < 0 else code


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        args = split_args(argv)
    except ValueError as error:
        print(f"{PREFIX} {error}", file=sys.stderr)
        return 2
    port = choose_master_port(args)
    if port is not None:
        print(f"{PREFIX} port {DEFAULT_PORT} is in use on this machine (another job?); "
              f"using --master_port {port}", flush=True)
    return Supervisor(runner_command(args, port), args.script).run()


if __name__ == "__main__":
    sys.exit(main())
