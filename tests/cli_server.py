"""Started by tests/conftest.py (`cli()`, `start_cli()`, `CLIENT`): runs `fastestimator ARGS` and `python ARGS`
commands each in a process of its own, without paying the imports (TensorFlow, torch, FastEstimator: most of a tiny
run's wall time) for every one.

    python tests/cli_server.py SOCKET        # until its stdin closes

It imports what every `fastestimator train apphub_vit/...` run imports, then listens on the Unix socket SOCKET. A
request is one byte that carries three file descriptors (the command's stdin, stdout, stderr), then JSON (argv, cwd,
env) up to the end of what the client sends. The server forks a child for it, which runs the command with those as its
standard files, in that folder, with that environment: argv ["fastestimator", ...] as FastEstimator's console script
(`fastestimator.cli.main.main()`), ["python", "-m", MODULE, ...] or ["python", SCRIPT, ...] as the interpreter does.
The child ends as the interpreter ends any run (an uncaught exception's traceback on stderr and exit status 1,
non-daemon threads joined, atexit handlers run: a run's lock released), short of tearing its modules down. The server
answers with a line holding the child's pid, and once the child is gone with a line holding its exit status (negative:
the signal that ended it, as subprocess.Popen.returncode says it). tests/cli_client.py is such a client, for commands
that start processes of their own (the benchmark scripts' --cli, torchrun's --no-python).
"""
import atexit
import json
import os
import random
import runpy
import select
import signal
import socket
import sys
import tempfile
import threading

sys.path[0] = os.path.dirname(sys.executable)  # as for the console script: this folder (tests/) is not importable

import fastestimator as fe  # noqa: E402
import matplotlib.pyplot  # noqa: E402,F401  (the prediction grid, at a run's end)
import numpy as np  # noqa: E402
import pyfiglet  # noqa: E402,F401  (the banner)
import torch._dynamo  # noqa: E402,F401  (torch.optim imports it on building the first optimizer)
import torch.distributed.run  # noqa: E402,F401
import torchvision  # noqa: E402,F401  (the batched augmentation)
from fastestimator.cli.main import main  # noqa: E402
from fastestimator.util.util import Suppressor  # noqa: E402

import apphub_vit.distributed  # noqa: E402,F401
import apphub_vit.finetune  # noqa: E402,F401
import apphub_vit.pretrain  # noqa: E402,F401

fe.Estimator, fe.Network, fe.Pipeline  # FastEstimator's lazily imported modules

_clients = {}  # pid -> the connection its status goes to


def _reap(signum, frame):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = _clients.pop(pid)
        try:
            conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        except OSError:  # the client is gone
            pass
        conn.close()


def _run_child(request, fds):
    """In the forked child: the command, as `fastestimator` or `python` runs it; never returns to the server's loop."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command's own subprocesses are its to wait for
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    # what a process makes of its own on importing FastEstimator: the files its Suppressor stashes output in (made on
    # import, removed at exit: shared, the first child to end would take them from the others), fresh random seeds
    for name in ("stash_name", "tf_print_name"):
        fd, path = tempfile.mkstemp()
        os.close(fd)
        setattr(Suppressor, name, path)
    Suppressor.tf_print_name_f = "file://" + Suppressor.tf_print_name
    random.seed()
    np.random.seed()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    try:
        if argv[0] == "fastestimator":
            sys.argv = argv
            main()
        elif argv[1] == "-m":
            sys.argv = argv[2:]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            sys.path[0] = os.path.dirname(os.path.abspath(argv[1]))
            runpy.run_path(argv[1], run_name="__main__")
        code = 0
    except SystemExit as stop:  # as the interpreter reads it
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int) and stop.code is not None:
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: B036 (an uncaught exception: its traceback, exit status 1)
        sys.excepthook(*sys.exc_info())
        code = 1
    # the interpreter's exit up to tearing its modules down (seconds for TensorFlow's and torch's, and nothing a test
    # reads): non-daemon threads joined, atexit handlers run (a run's lock released), the output flushed
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def serve(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, _reap)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready:  # the tests are over
            os.remove(path)
            return
        conn, _ = listener.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
        request = json.loads(data)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # its connection known before it can be reaped
        pid = os.fork()
        if pid == 0:
            for other in [listener, conn, *_clients.values()]:
                other.close()
            _run_child(request, fds)
        for fd in fds:
            os.close(fd)
        _clients[pid] = conn
        conn.sendall(f"{pid}\n".encode())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


if __name__ == "__main__":
    serve(sys.argv[1])
