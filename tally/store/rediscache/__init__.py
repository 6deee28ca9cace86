"""The cluster's hot-count cache: Redis in front of PostgreSQL counts."""
