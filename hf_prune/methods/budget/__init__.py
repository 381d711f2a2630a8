"""A parameter budget: the mix of depth, heads, hidden size and MLP neurons that reaches it with the lowest KL."""
