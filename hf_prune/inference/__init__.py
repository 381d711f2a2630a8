"""Running a pruned model faster: PyTorch's 2:4 semi-structured sparse kernels."""
