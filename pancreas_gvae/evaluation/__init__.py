"""Evaluation: generative models compared on held-out data (``compare``, ``heldout``) and the metrics they use."""
