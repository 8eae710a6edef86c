"""Engines run a model forward (greedy generation, first-token and teacher-forced log-probs) with an ablation applied.
`transformers` is the reference engine, with its speed paths (shared prompt head, prefix reuse, packed weights,
static decoding); the interface every engine implements is `abliterate.plugins.Engine`."""
