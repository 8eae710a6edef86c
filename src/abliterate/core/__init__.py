"""Stage 1, the ground everything stands on: architectures, loading, prompts, judges, settings, run folders."""
