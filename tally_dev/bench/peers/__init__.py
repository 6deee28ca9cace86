"""The designs a team would otherwise build, served by Tally's own HTTP stack.

Each peer is a storage backend behind the same FastAPI app, middleware, request schemas and
validation as Tally (``peers.app``), run by the same uvicorn settings, so a comparison measures
storage against storage and not one framework against another.
"""
