"""Offline replay: the SPEC document of an event stream, computed by the node's own kernel.

    from exposure.replay import Engine, read_events, document
    eng = Engine()
    eng.apply(read_events("events.jsonl"))
    print(document(eng.state))

The implementations are :mod:`exposure.engine.replay`, :mod:`exposure.engine.parse` and
:mod:`exposure.engine.document`; this module is what users import.
"""

from exposure.engine.document import compare_documents, document, document_from_cells
from exposure.engine.parse import EventFileError, parse_events, read_events, record_objects
from exposure.engine.replay import Engine, replay_records

__all__ = ["Engine", "replay_records", "read_events", "parse_events", "record_objects",
           "EventFileError", "document", "document_from_cells", "compare_documents"]
