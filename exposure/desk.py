"""Read-only access to a node's (or a consolidator's) tallies in shared memory.

    from exposure.desk import Desk
    with Desk("exposure") as d:
        print(d.fund(), d.accounts()[:5])

The implementation is :mod:`exposure.engine.desk`; this module is what users import.
"""

from exposure.engine.desk import ACCOUNT_ROW, INSTRUMENT_ROW, POSITION_ROW, SECTOR_ROW, Desk

__all__ = ["Desk", "ACCOUNT_ROW", "INSTRUMENT_ROW", "SECTOR_ROW", "POSITION_ROW"]
