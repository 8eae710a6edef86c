"""Stage 6, using a model: interactive chat and the OpenAI/Ollama-compatible server."""
