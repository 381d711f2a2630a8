"""Training a pruned model without losing its zeros: masks, the Trainer callback, the LoRA merge."""
