"""The guarded VLM endpoint: OpenAI-compatible chat completions on Ray Serve, streaming with hold-back."""
