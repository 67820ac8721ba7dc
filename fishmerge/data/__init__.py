"""Data layer: Stack Overflow (TFF) files, Stack Exchange dumps, synthetic users, per-user partitions."""
