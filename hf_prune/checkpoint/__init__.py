"""What is written to disk and read back: the pruning record, atomic saves, compressed files, provenance."""
