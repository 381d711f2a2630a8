"""LLM-Barber (arXiv 2408.10631): ``method`` (config and pruner), ``blocks`` (dense/pruned block
passes), ``swaps`` (exact pair swaps on the output error)."""
