"""The risk desk's web page (``exposure web``): live tallies in a browser.

:mod:`~exposure.web.users` (the users file: who may log in and which accounts each sees),
:mod:`~exposure.web.view` (the book the page shows, built from the feed, and the messages
pushed to each client), :mod:`~exposure.web.app` (the Starlette routes, the WebSocket push,
security headers, bounded clients), :mod:`~exposure.web.serve` (uvicorn, TLS, the checks
before binding) and ``static/`` (the page: plain HTML, CSS and JS). docs/web.md.
"""
