"""exposure: a real-time consolidated exposure monitor for a multi-manager fund.

The public modules users import (each has ``__all__``; everything else is internal):

* :mod:`exposure.desk`: ``Desk``, read-only access to a node's (or a consolidator's)
  tallies in shared memory.
* :mod:`exposure.feed`: ``Subscriber``, a self-healing copy of a node's multicast feed.
* :mod:`exposure.client`: ``send_records``, a session client with resends and failover.
* :mod:`exposure.replay`: offline replay (``Engine``, ``read_events``) and the SPEC
  document (``document``).
* :mod:`exposure.config`: node configuration (``load_config``).

The packages behind them, one concern each, lowest layer first (a module imports only
from its own layer or a lower one; ``tests/test_layers.py`` checks it, and
``docs/design.md`` lists every module):

``core`` < ``shm`` < ``engine`` < ``store`` < ``net`` < ``pair`` < ``config`` < ``feed``
< ``node`` < ``cluster`` < ``harness`` < ``bench`` < ``ops`` < the public modules.
"""

__version__ = "0.1.0"
