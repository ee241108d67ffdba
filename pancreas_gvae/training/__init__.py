"""Training: the per-kind steps, the trainer that owns optimisers/EMA/RNG, checkpoints and the loop."""
