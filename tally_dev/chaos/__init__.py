"""The chaos harness: faults injected into the HA dev cluster under a client ledger."""
