"""A session client: send records to a node (or a pair) with resends and failover.

    from exposure.client import send_records
    acked = send_records(records, host="127.0.0.1", port=9400, session=1, secret=b"...")

The implementation is :mod:`exposure.net.client`; this module is what users import.
"""

from exposure.net.client import HEARTBEAT_S, SendError, login, send_records

__all__ = ["send_records", "SendError", "login", "HEARTBEAT_S"]
