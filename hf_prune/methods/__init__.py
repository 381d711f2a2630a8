"""Pruning methods: one module per method (a folder for multi-file ones), listed in ``registry``.

Each method module holds its ``PruningConfig`` subclass and its ``LayerPruner`` (the
contract is in ``base``); ``patterns`` holds the sparsity patterns they share, ``owl`` the
outlier-weighted layer sparsity any unstructured method can use, and ``structured`` the
shared base and baselines of the methods that remove neurons and heads; ``depth`` removes
whole decoder layers, ``experts`` whole routed experts of mixture-of-experts layers. Import the
public classes from ``hf_prune``.
"""
