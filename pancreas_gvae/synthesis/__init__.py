"""Synthesis: prior samples from a trained generator, their checks (plausibility, memorisation) and exports."""
