"""Docker engines over ssh (``ssh://user@host[:port]``): connecting, and one clear message
naming the endpoint, where it came from and the fix when that fails.

The Docker SDK has two ssh transports: paramiko (its default) and the system ssh client
(``use_ssh_client=True``). We use paramiko, by what works:

- its failures are exceptions at connect time, in this process, so a refused key, an
  unknown host key or an unreachable host become one message; the system client writes
  its own errors to our stderr, once per pooled HTTP connection, and the SDK only sees a
  stream that ended;
- the agent's exec stream is a paramiko channel, which half-closes (``shutdown(SHUT_WR)``
  sends EOF); the SDK's ``SSHSocket`` wraps an ssh process's pipes and its ``shutdown``
  fails (it is a never-connected socket);
- one ssh connection carries every request as a channel; the system client starts one
  ssh process per pooled connection.

Both run ``docker system dial-stdio`` on the other side, so that host needs the docker
CLI and an engine the login user may use. What paramiko reads of the user's ssh setup:
``~/.ssh/config`` (HostName, Port, User, IdentityFile, ProxyCommand), the host keys in
``~/.ssh/known_hosts`` (an unknown host is refused, as with StrictHostKeyChecking), the
ssh agent and the ``~/.ssh/id_*`` keys.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Any

from pytest_isolate.errors import BackendUnavailable

#: How long the reachability probe waits for the TCP connection (the OS waits minutes).
CONNECT_TIMEOUT = 10.0
#: What a second try by hand shows (ssh's own words) once the fix is made.
PROBE = "docker version --format '{{.Server.Version}}'"


def is_ssh(url: str) -> bool:
    return url.startswith("ssh://")


def _login(url: str) -> tuple[str | None, str, int]:
    """User, host and port of an ssh:// URL as paramiko will use them (~/.ssh/config's
    User, HostName and Port fill what the URL leaves out, as in the SDK)."""
    parsed = urllib.parse.urlparse(url)
    user, host, port = parsed.username, parsed.hostname or "", parsed.port
    config_file = os.path.expanduser("~/.ssh/config")
    if os.path.exists(config_file):
        import paramiko

        config = paramiko.SSHConfig.from_path(config_file).lookup(host)
        host = config.get("hostname", host)
        port = port or int(config.get("port", 22))
        user = user or config.get("user")
    return user, host, port or 22


def _by_hand(url: str) -> str:
    user, host, port = _login(url)
    return f"ssh -p {port} {user + '@' if user else ''}{host}"


def unavailable(url: str, origin: str, reason: str, fix: str) -> BackendUnavailable:
    return BackendUnavailable("docker", f"the docker engine at {url} (from {origin}) {reason}",
                              fix)


def _reachable(url: str, origin: str) -> None:
    """Fail fast, naming the endpoint, when nothing listens (paramiko would wait for the
    OS's TCP timeout). Skipped behind a ProxyCommand: the proxy is what connects."""
    config_file = os.path.expanduser("~/.ssh/config")
    if os.path.exists(config_file):
        import paramiko

        host = urllib.parse.urlparse(url).hostname or ""
        if "proxycommand" in paramiko.SSHConfig.from_path(config_file).lookup(host):
            return
    _, host, port = _login(url)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise unavailable(url, origin, f"cannot be reached: no ssh server answers on "
                          f"{host} port {port} ({exc})",
                          "start sshd there, or correct the host and port") from None


def connect(docker: Any, url: str, origin: str) -> Any:
    """A DockerClient for an ssh:// engine; BackendUnavailable saying what to fix."""
    try:
        import paramiko
    except ImportError:
        raise unavailable(url, origin, "needs paramiko, the SDK's ssh transport",
                          "pip install 'pytest-isolate-env[docker]' (it brings docker[ssh])"
                          ) from None
    _reachable(url, origin)
    by_hand = _by_hand(url)
    try:
        return docker.DockerClient(base_url=url, use_ssh_client=False)
    except paramiko.AuthenticationException as exc:
        raise unavailable(url, origin, f"is behind an ssh server that refused every key "
                          f"offered ({exc})",
                          "add your public key to the remote user's ~/.ssh/authorized_keys "
                          f"(ssh-copy-id), or name the key with IdentityFile in ~/.ssh/config; "
                          f"`{by_hand} {PROBE}` must work without a password") from None
    except paramiko.BadHostKeyException as exc:
        raise unavailable(url, origin, f"is behind an ssh server whose host key changed ({exc})",
                          "check that the host is the one you mean, then replace its line in "
                          "~/.ssh/known_hosts (ssh-keygen -R)") from None
    except paramiko.SSHException as exc:
        if "known_hosts" in str(exc):
            raise unavailable(url, origin, f"is behind an ssh server whose host key is not "
                              f"known ({exc})",
                              f"record the key: run `{by_hand} true` once and accept it (the "
                              "key goes to ~/.ssh/known_hosts)") from None
        raise unavailable(url, origin, f"cannot be reached over ssh ({exc})",
                          f"`{by_hand} {PROBE}` must work") from None
    except OSError as exc:
        raise unavailable(url, origin, f"cannot be reached over ssh ({exc})",
                          f"`{by_hand} {PROBE}` must work") from None
    except docker.errors.DockerException as exc:  # logged in; `docker system dial-stdio` failed
        raise diagnose(url, origin, exc) from None


def _run_there(url: str, command: str) -> tuple[int, str]:
    """Exit status and stderr of command run over ssh the way the SDK logs in."""
    import paramiko

    user, host, port = _login(url)
    keys: dict[str, Any] = {}
    config_file = os.path.expanduser("~/.ssh/config")
    if os.path.exists(config_file):
        found = paramiko.SSHConfig.from_path(config_file).lookup(
            urllib.parse.urlparse(url).hostname or "")
        if "identityfile" in found:
            keys["key_filename"] = found["identityfile"]
    ssh = paramiko.SSHClient()
    try:
        ssh.load_system_host_keys()
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        ssh.connect(host, port, user, timeout=CONNECT_TIMEOUT, **keys)
        _, out, err = ssh.exec_command(command, timeout=30)
        status = out.channel.recv_exit_status()
        return status, err.read().decode(errors="replace").strip()
    finally:
        ssh.close()


def diagnose(url: str, origin: str, exc: BaseException) -> BackendUnavailable:
    """Why an ssh engine that let us log in does not answer: run the docker CLI there."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        status, err = _run_there(url, PROBE)
        if status != 0:
            last = err.splitlines()[-1] if err else ""
            detail = f"`{PROBE}` there exits with status {status}: {last}"
    except Exception as probe:
        detail += f"; `{PROBE}` could not be run there ({probe})"
    return unavailable(url, origin, f"does not answer: the ssh login works, but {detail}",
                       "install Docker there (the SDK runs `docker system dial-stdio` on that "
                       "host) and let the login user reach its engine (root, or the docker "
                       "group)")
