"""Constitutional-AI safety training toolkit."""
