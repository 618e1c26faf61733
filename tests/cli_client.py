"""`python tests/cli_client.py fastestimator ARGS` (or `... python ARGS`): the command run by tests/cli_server.py, whose
socket the environment's CLI_SERVER_SOCKET names, on this process's standard files, folder and environment; this
process ends with the command's exit status, and passes SIGTERM and SIGINT on to it (as torchrun stops its workers).
Imports nothing heavy: it starts in a few hundredths of a second."""
import json
import os
import signal
import socket
import sys


def main(argv):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ["CLI_SERVER_SOCKET"])
    socket.send_fds(conn, [b"\0"], [0, 1, 2])
    conn.sendall(json.dumps(dict(argv=argv, cwd=os.getcwd(), env=dict(os.environ))).encode())
    conn.shutdown(socket.SHUT_WR)
    answers = conn.makefile()
    pid = int(answers.readline())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
    line = answers.readline()
    if not line:
        sys.exit("tests/cli_server.py ended before the command did")
    code = int(line)
    if code < 0:  # ended by a signal: so is this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
