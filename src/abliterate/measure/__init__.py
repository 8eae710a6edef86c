"""Stage 3, measuring: refusal directions, the ablation, and the metrics (KL, refusals, probes)."""
