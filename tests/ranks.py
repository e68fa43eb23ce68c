"""Starting ranks as torchrun would, for the multi-process tests: a free port, each
rank's environment variables, and the launchers installed beside this Python."""
import os
import shutil
import socket
import sys
from pathlib import Path


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
