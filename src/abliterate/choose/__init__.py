"""Stage 7, choosing a model: compare, verify, the catalog by hardware tier, and the HTML reports."""
