"""What the ``exposure`` command's subcommands share: a failure message, loading a node's
or a cluster's config, a session's secret, and waiting for a node that is starting on this
host."""

from __future__ import annotations

import os
import sys

__all__ = ["fail", "load_cfg", "load_cluster", "secret_of", "wait_if_starting"]


def fail(msg: str, code: int = 2) -> int:
    print(f"exposure: {msg}", file=sys.stderr)
    return code


def load_cfg(path):
    from exposure.config.node import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        raise SystemExit(fail(str(e))) from None


def load_cluster(path):
    from exposure.cluster.topology import ClusterError, load_cluster

    try:
        return load_cluster(path)
    except ClusterError as e:
        raise SystemExit(fail(str(e))) from None


def wait_if_starting(cfg, timeout: float) -> None:
    """A node of this config that runs on this host but does not accept sessions yet (it
    is loading or compiling its kernels, or recovering): wait for it, within ``timeout``.
    Anything else (no such node here, a backup, a remote node) is left to the connection."""
    import time

    from exposure.ops.status import read_control, read_counters
    from exposure.shm.control import CTL_ROLE, ROLE_BACKUP
    from exposure.shm.tally_segment import TallySegment

    deadline = time.monotonic() + timeout
    said = False
    while time.monotonic() < deadline:
        try:
            if read_counters(cfg)["ingest_listening"] or int(
                    read_control(cfg)[CTL_ROLE]) == ROLE_BACKUP:
                return
        except (FileNotFoundError, ValueError):
            # No counters yet: a supervisor that has made its tally segment is still
            # making the rest; no live writer of that segment: no node here.
            pid = TallySegment.writer_of(cfg.segment("tally"))
            try:
                if pid <= 0 or os.kill(pid, 0) is not None:
                    return
            except ProcessLookupError:
                return
            except PermissionError:
                pass
        if not said:
            said = True
            print(f"exposure: node {cfg.name!r} is starting; waiting for it to accept "
                  "sessions", file=sys.stderr, flush=True)
        time.sleep(0.05)


def secret_of(args, cfg, session: int, name: str | None = None):
    """The secret of ``session`` for ``cfg``: ``--secret-file``, else the config's sessions
    file, else None (an open node); or an exit code, the problem said. ``name``: a node's
    name to start the missing-secret message with."""
    from pathlib import Path

    from exposure.net.sessions import MIN_SECRET, SessionsError, secret_for

    try:
        if args.secret_file:
            secret = Path(args.secret_file).read_bytes().strip()
            if len(secret) < MIN_SECRET:
                return fail(f"--secret-file {args.secret_file}: {len(secret)} bytes; a "
                            f"secret has at least {MIN_SECRET}")
            return secret
        if cfg.sessions_file is not None:
            return secret_for(cfg.sessions_file, session)
    except OSError as e:
        return fail(f"cannot read the secret {args.secret_file!r}: {e.strerror or e}")
    except SessionsError as e:
        where = f"{name}: " if name else ""
        return fail(f"{where}no secret for session {session}: {e} (use --secret-file)")
    return None
