"""FISTAPruner (arXiv 2408.03728): ``method`` (config, pruner, hook passes) and ``solver`` (FISTA
with the lambda search)."""
