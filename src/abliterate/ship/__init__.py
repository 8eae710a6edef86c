"""Stage 4, shipping a model: Hugging Face folder and card, GGUF, Ollama, the hub."""
