"""Stage 5, the search: the Optuna study, the pick, and `run`, the main job that composes every stage below."""
