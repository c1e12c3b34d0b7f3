"""Shared structures: their layouts, and (with the live node) the segments that hold them."""
