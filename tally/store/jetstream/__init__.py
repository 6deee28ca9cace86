"""The cluster's event log: NATS JetStream streams partitioned by item."""
