"""The designs a team would otherwise hand-roll, each behind a lean server (``peers.lean``).

The server is granian's RSGI interface with orjson and hand-written checks, not Tally's stack:
a comparison then shows what Tally costs against what a capable engineer would build, framework
overhead included. ``bare`` is that server with no storage at all: its ceiling.
"""
