"""Starting ranks as torchrun would, for the multi-process tests: a free port, each
rank's environment variables, the launchers installed beside this Python, and ranks
forked from the test process."""
import atexit
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from asyncdiff_rt.engine import links


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world, port):
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def installed(tool):
    """The path of console script `tool` (torchrun, asyncdiff-rt), this environment's first."""
    return shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)


def start_rank(script, args, env, log):
    """Run `python script *args` with `env` as a child process writing to `log`; returns
    a Popen, or an object with its `pid`, `poll`, `wait`, `kill` and `returncode`.

    On the CPU it is forked from this process, which has imported torch, diffusers and
    the runtime already: a rank then starts in well under a second instead of paying
    5-10 s of imports on the 2-core machine (2026-12-03). A process that has used CUDA
    cannot fork one that uses it again, so GPU tests get a fresh interpreter."""
    if torch.cuda.is_initialized() or any(a in ("--cuda", "--same-gpu") for a in map(str, args)):
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        _run_forked(script, args, env, log)
    return _Forked(pid)


def _run_forked(script, args, env, log):
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2), os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # not pytest's capture
        for sig in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM):  # the test runner's handlers
            signal.signal(sig, signal.SIG_DFL)
        atexit._clear()  # the test runner's exit handlers are not this rank's; the runtime's own
        atexit.register(links._close_at_exit)  # (registered at its import) is
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [str(script), *map(str, args)]
        try:
            runpy.run_path(str(script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        atexit._run_exitfuncs()  # the runtime's own, as at the end of a script
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


class _Forked:
    def __init__(self, pid):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def run_ranks(script, args, world, folder, timeout, hung=None, env=None):
    """Run `world` ranks of `python script *args` (torchrun's variables, a fresh port,
    then `env`, where None removes a variable), logging to folder/log<rank>.txt;
    [(return code, log tail)] per rank, or a test failure naming the rank that did not
    exit within `timeout` s. Rank `hung` is killed once the others have exited. No rank
    outlives the call."""
    port, start = free_port(), time.monotonic()
    envs = [{k: v for k, v in {**rank_env(r, world, port), **(env or {})}.items() if v is not None}
            for r in range(world)]
    logs = [Path(folder) / f"log{r}.txt" for r in range(world)]
    procs = [start_rank(script, args, envs[r], logs[r]) for r in range(world)]
    done = {}
    try:
        for rank in [r for r in range(world) if r != hung] + ([hung] if hung is not None else []):
            if rank == hung:
                procs[rank].kill()
            try:
                procs[rank].wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} did not exit within {timeout} s")
            done[rank] = (procs[rank].returncode, logs[rank].read_text(errors="replace")[-3000:])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return [done[r] for r in range(world)]
