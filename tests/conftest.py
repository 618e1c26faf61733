"""Shared test fixtures: tiny configurations that keep every app run to seconds on a 2-core CPU."""
import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the project's data folder beside the checkout; absent in some clones

# A ViT small enough for CPU tests: 2 layers, dim 32, patch 8 (16 tokens + CLS)
TINY_SHAPE = dict(num_layers=2, em_dim=32, num_heads=2, ff_dim=64, patch_size=8)
# ... as the CIFAR ViT apps' options, without the distillation teacher: recipe "vit" first trains a ResNet-9 for 12
# epochs, minutes on a CPU (tests/test_teacher.py runs it with fewer)
TINY_VIT = dict(TINY_SHAPE, distill=0)
TINY_RUN = dict(epochs=1, batch_size=16, train_steps_per_epoch=4, eval_steps_per_epoch=2, num_process=0,
                synthetic_size=[256, 64])


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (the project's shared data folder beside the checkout); "
                    f"this test needs the real data there")
    return path


def cli_env() -> dict:
    """Environment for `fastestimator train` subprocesses: quiet TF, the repo importable, no GPU."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def fastestimator_cmd() -> list:
    """The `fastestimator` command as users run it: the console script beside this Python, else its entry point."""
    script = Path(sys.executable).with_name("fastestimator")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from fastestimator.cli.main import main; main()"]


@pytest.fixture(autouse=True)
def no_full_teacher_in_tests(monkeypatch):
    """A test that builds recipe "vit" as it is would train its ResNet-9 teacher for 12 epochs, minutes on a CPU:
    fail it at once, saying how to keep it to seconds."""
    from apphub_vit import vit_app
    train_teacher = vit_app.train_teacher

    def guarded(*args, **kwargs):
        epochs = kwargs.get("epochs", args[3] if len(args) > 3 else None)
        if epochs is not None and epochs > 2:
            pytest.fail(f"this test trains the distillation teacher for {epochs} epochs: pass distill=0 "
                        f"(conftest.TINY_VIT) or teacher_epochs=1")
        return train_teacher(*args, **kwargs)

    monkeypatch.setattr(vit_app, "train_teacher", guarded)


class ForkedRun:
    """A command running in a child of tests/cli_server.py, read as a subprocess.Popen is: pid, poll(), wait(),
    send_signal(), terminate(), kill(), and, once it ended, returncode, stdout and stderr (text)."""
    def __init__(self, conn: socket.socket, folder: Path) -> None:
        self.conn, self.folder, self.returncode = conn, folder, None
        self._answers = conn.makefile()
        self.pid = int(self._answers.readline())

    def poll(self):
        if self.returncode is None and select.select([self.conn], [], [], 0)[0]:
            line = self._answers.readline()
            assert line, "tests/cli_server.py ended before the command did"
            self.returncode = int(line)
            self._answers.close()
            self.conn.close()
        return self.returncode

    def wait(self, timeout: float = 600):
        if self.returncode is None and not select.select([self.conn], [], [], timeout)[0]:
            self.kill()
            self.wait()
            raise subprocess.TimeoutExpired(["fastestimator"], timeout, self.stdout, self.stderr)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def stdout(self) -> str:
        return (self.folder / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr").read_text(errors="replace")


class CliServer:
    """tests/cli_server.py, started on the first command a session runs and ended with the session."""
    proc = None
    folder = None  # its socket, and the commands' output files
    count = 0

    @classmethod
    def socket_path(cls) -> str:
        """The server's socket, once it is ready (for tests/cli_client.py: its CLI_SERVER_SOCKET)."""
        if cls.proc is None or cls.proc.poll() is not None:
            if cls.folder is None:
                cls.folder = Path(tempfile.mkdtemp(prefix="cli_server_"))
                atexit.register(cls.stop)
            path = cls.folder / "socket"
            if path.exists():
                path.unlink()
            cls.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_server.py"), str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env(),
                                        cwd=REPO)
            ready, _, _ = select.select([cls.proc.stdout], [], [], 300)
            assert ready and cls.proc.stdout.readline().strip() == "ready", "tests/cli_server.py did not start"
        return str(cls.folder / "socket")

    @classmethod
    def start(cls, argv: list, cwd, env: dict) -> ForkedRun:
        path = cls.socket_path()
        cls.count += 1
        folder = cls.folder / str(cls.count)
        folder.mkdir()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        with open(os.devnull) as stdin, open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
            socket.send_fds(conn, [b"\0"], [stdin.fileno(), stdout.fileno(), stderr.fileno()])
        conn.sendall(json.dumps(dict(argv=[str(a) for a in argv], cwd=str(cwd), env=env)).encode())
        conn.shutdown(socket.SHUT_WR)
        return ForkedRun(conn, folder)

    @classmethod
    def stop(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()
            cls.proc.wait(60)
        if cls.folder is not None:
            shutil.rmtree(cls.folder, ignore_errors=True)


def start_cli(args: list, cwd, env: Optional[dict] = None) -> ForkedRun:
    """`fastestimator ARGS` in cwd, started: a process of its own as from the console script (cli_env()'s environment
    and env's variables), forked from one that imported TensorFlow, torch and FastEstimator once for every command.
    ["python", ...] as args runs the interpreter's command instead (a script, or -m MODULE)."""
    argv = list(args) if args and args[0] == "python" else ["fastestimator"] + list(args)
    return CliServer.start(argv, cwd, dict(cli_env(), **(env or {})))


def cli(args: list, cwd, env: Optional[dict] = None, timeout: float = 600) -> ForkedRun:
    """`fastestimator ARGS` (start_cli's) run to its end: returncode, stdout, stderr."""
    run = start_cli(args, cwd, env)
    run.wait(timeout)
    return run


# a command that runs through the server, for programs that start processes of their own (the benchmark scripts' --cli,
# torchrun's --no-python); the environment they pass on names the socket: CLI_SERVER_SOCKET=CliServer.socket_path()
CLIENT = [sys.executable, str(REPO / "tests" / "cli_client.py")]
