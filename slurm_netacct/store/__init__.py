"""The node's durable journal: SQLite (job rows, traffic, leases), the spool, read-only access."""
