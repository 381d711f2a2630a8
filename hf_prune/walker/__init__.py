"""The layer walker: a causal LM's decoder layers and the prunable weights inside them."""
