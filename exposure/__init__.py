"""exposure: a real-time consolidated exposure monitor for a multi-manager fund.

The public modules (each has ``__all__``; everything else is internal):

* :mod:`exposure.desk`: ``Desk``, read-only access to a node's (or a consolidator's)
  tallies in shared memory.
* :mod:`exposure.feed`: ``Subscriber``, a self-healing copy of a node's multicast feed.
* :mod:`exposure.client`: ``send_records``, a session client with resends and failover.
* :mod:`exposure.replay`, :mod:`exposure.document`, :mod:`exposure.parse`: offline replay
  and the SPEC document.
* :mod:`exposure.config`: node configuration (``load_config``).
* :mod:`exposure.partition`, :mod:`exposure.cluster`: a cluster's partition map, routing
  and composed document.
* :mod:`exposure.cli`: the ``exposure`` command.
"""

__version__ = "0.1.0"
