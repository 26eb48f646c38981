"""`graft serve`: the OCI distribution API over content-addressed blobs and SQLite, tokens,
Graft-aware checks at push, search and server-rendered pages (see docs/serve.md).

Nothing here is imported by the client (``graft.hub``); the server uses ``hub`` and ``format``.
Run it with ``graft serve``; build the ASGI app with ``graft.server.app.create_app``.
"""
