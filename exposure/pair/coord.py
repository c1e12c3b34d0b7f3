"""The pair's coordination store in etcd: one record changed only by compare-and-swap, and
one liveness key per member.

Keys under the configured prefix (``[replication] etcd_prefix``, e.g. ``/exposure/fund``)::

    <prefix>/pair              {"epoch": 7, "primary": "a", "sync": "b"}
    <prefix>/members/<name>    {"role": "backup", "epoch": 7, "tail": 1234, "in_sync": true,
                                "following": 7}          (under the member's own lease)

``pair`` is the whole truth about roles (Patroni's leader and ``/sync`` keys in one value):

* ``epoch`` goes up on every change of primary; it is the fencing token that records,
  datagrams and replication frames carry, and a node that sees a higher one demotes;
* ``primary`` names the node that may accept sessions at that epoch;
* ``sync`` names the synchronous member, the only node that may be promoted, or is empty:
  the primary **runs alone** (it acknowledges on its own durability, and no stale backup
  may take over).

It is only ever changed by :meth:`PairStore.swap`, a transaction that compares the key's
``mod_revision`` with the one read, so two nodes that race for a transition (a backup
promoting itself, a primary recording that it runs alone) cannot both win.

The members' keys are advisory: they say who is alive (the lease expires a few seconds
after a node dies) and what each holds; a primary reads its backup's to know that the
backup follows its epoch before it records it as synchronous, and a restarting node reads
them to compare journal tails.

The client is ``etcd3gw`` (the v3 JSON gateway). Every call has a short timeout and tries
each endpoint in turn; when none answers, :class:`CoordError` says so and the caller decides
(a healthy pair keeps serving; a transition waits).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

__all__ = ["PairState", "PairStore", "CoordError", "parse_endpoint"]


class CoordError(RuntimeError):
    """etcd could not be reached (every endpoint failed), or it answered nonsense."""


@dataclass(frozen=True)
class PairState:
    epoch: int
    primary: str
    sync: str = ""   # "": the primary runs alone

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, raw: bytes | str) -> PairState:
        try:
            d = json.loads(raw)
            st = cls(int(d["epoch"]), str(d["primary"]), str(d.get("sync", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise CoordError(f"the pair record in etcd is not valid: {raw[:200]!r} ({e})") from None
        if st.epoch < 1 or not st.primary:
            raise CoordError(f"the pair record in etcd is not valid: {raw[:200]!r}")
        return st

    def describe(self) -> str:
        return (f"epoch {self.epoch}, primary {self.primary!r}, "
                + (f"synchronous backup {self.sync!r}" if self.sync else "running alone"))


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """``http://host:port`` -> (protocol, host, port); ValueError names the bad value."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
        raise ValueError(f"{url!r}: expected http://HOST:PORT")
    try:
        port = u.port or 2379
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number 1..65535") from None
    return u.scheme, u.hostname, port


class PairStore:
    """The pair's record and member keys in etcd (see the module docstring).

    ``timeout`` bounds each HTTP request; a call tries each endpoint once, starting with
    the one that answered last."""

    def __init__(self, endpoints: list[str] | tuple[str, ...], prefix: str,
                 timeout: float = 0.5, member_ttl: int = 3):
        import etcd3gw

        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.prefix = prefix.rstrip("/")
        self.key = f"{self.prefix}/pair"
        self.member_prefix = f"{self.prefix}/members/"
        self.member_ttl = member_ttl
        self.clients = []
        for url in endpoints:
            proto, host, port = parse_endpoint(url)
            self.clients.append(etcd3gw.Etcd3Client(host=host, port=port, protocol=proto,
                                                    timeout=timeout, api_path="/v3/"))
        self.endpoints = list(endpoints)
        self.current = 0
        self.lease = None
        self.member_info = ("", "")

    # ------------------------------------------------------------------ plumbing
    def _call(self, fn):
        """``fn(client)`` on the endpoint that answered last, then on the others."""
        import etcd3gw.exceptions as X

        errors = []
        n = len(self.clients)
        for i in range(n):
            k = (self.current + i) % n
            try:
                out = fn(self.clients[k])
            except (X.Etcd3Exception, OSError, ValueError, KeyError) as e:
                errors.append(f"{self.endpoints[k]}: {type(e).__name__} {e}".strip())
                continue
            self.current = k
            return out
        raise CoordError("etcd unreachable (" + "; ".join(errors) + ")")

    @staticmethod
    def _b64(s: str | bytes) -> str:
        from etcd3gw.utils import _encode

        return _encode(s)

    @staticmethod
    def _unb64(s: str) -> bytes:
        from etcd3gw.utils import _decode

        return _decode(s)

    # ------------------------------------------------------------------ the record
    def read(self) -> tuple[PairState | None, int, dict[str, dict]]:
        """(the record or None, its mod_revision (0 when absent), the live members by
        name) in one range request over the prefix."""
        def rng(c):
            return c.post(c.get_url("/kv/range"), json={
                "key": self._b64(self.prefix + "/"),
                "range_end": self._b64(self.prefix + "0")})  # '0' follows '/'
        res = self._call(rng)
        state, rev, members = None, 0, {}
        for kv in res.get("kvs", []):
            key = self._unb64(kv["key"]).decode(errors="replace")
            value = self._unb64(kv.get("value", ""))
            if key == self.key:
                state, rev = PairState.decode(value), int(kv["mod_revision"])
            elif key.startswith(self.member_prefix):
                try:
                    members[key[len(self.member_prefix):]] = json.loads(value)
                except ValueError:
                    continue  # not ours to judge; ignored
        return state, rev, members

    def swap(self, rev: int, new: PairState) -> bool:
        """Replace the record if it is still at ``rev`` (0: create it if absent). True if
        this call changed it; False if someone else did first. CoordError if etcd cannot
        be reached (then it is unknown whether the swap happened: read again)."""
        cmp = ({"key": self._b64(self.key), "result": "EQUAL", "target": "CREATE",
                "create_revision": 0} if rev == 0 else
               {"key": self._b64(self.key), "result": "EQUAL", "target": "MOD",
                "mod_revision": rev})
        txn = {"compare": [cmp],
               "success": [{"request_put": {"key": self._b64(self.key),
                                            "value": self._b64(new.encode())}}],
               "failure": []}
        res = self._call(lambda c: c.transaction(txn))
        return bool(res.get("succeeded", False))

    # ------------------------------------------------------------------ members
    def publish_member(self, name: str, info: dict | None) -> None:
        """Keep this member's key under its lease: ``info`` given, put it (granting the
        lease on first use); None, only keep the lease alive (one request; the key is put
        again with the last info if the lease had expired). Call at least every
        ``member_ttl / 3`` seconds."""
        if info is not None:
            self.member_info = (name, json.dumps(info, sort_keys=True))

        def keep(c):
            fresh = self.lease is None or self.lease[0] is not c
            if not fresh and self.lease[1].refresh() <= 0:
                fresh = True  # it expired: the key went with it
            if fresh:
                self.lease = (c, c.lease(self.member_ttl))
            if fresh or info is not None:
                c.put(self.member_prefix + self.member_info[0], self.member_info[1],
                      lease=self.lease[1])
        try:
            self._call(keep)
        except CoordError:
            self.lease = None
            raise

    def withdraw_member(self, name: str) -> None:
        """Remove this member's key now (a clean stop), best effort."""
        try:
            if self.lease is not None:
                self._call(lambda c: self.lease[1].revoke())
            else:
                self._call(lambda c: c.delete(self.member_prefix + name))
        except CoordError:
            pass
        self.lease = None

    def close(self) -> None:
        for c in self.clients:
            c.session.close()
