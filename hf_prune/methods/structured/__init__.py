"""Structured methods' shared base (configuration, kept counts, shrinking), scores and baselines."""
