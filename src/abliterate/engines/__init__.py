"""Stage 2, decoding: the engines that run a model forward (generation, log-probs) and their speed paths."""
