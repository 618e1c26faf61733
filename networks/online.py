"""Whether a host answers: the check before a download, so that an offline machine fails in seconds, not a hang."""
import socket


def online(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True if a TCP connection to `host`:`port` opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
