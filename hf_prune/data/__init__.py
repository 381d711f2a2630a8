"""Text in: calibration windows, perplexity evaluation, the bundled C4 sample and SmolLM2 model."""
