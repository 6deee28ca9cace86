"""``tally capacity``: the fleet, storage and bandwidth a load needs, from measured per-core costs.

``model`` is the arithmetic (no I/O), ``rates`` the per-core figures (built in, or read from a
benchmark result), ``render`` the text and JSON, ``cli`` the command.
"""
