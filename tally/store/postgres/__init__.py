"""The cluster's record store: PostgreSQL databases holding logical shards of like records,
counts and the outbox."""
