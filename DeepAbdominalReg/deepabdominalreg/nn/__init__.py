"""Neural networks, losses and the model registry (shipped weights in ``weights/`` with their cards)."""
