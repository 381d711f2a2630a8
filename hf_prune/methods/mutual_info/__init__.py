"""Mutual-information neuron pruning (arXiv 2406.00030): ``method`` and ``estimators``."""
