"""Measuring models: speed (latency, memory), quality (perplexity, KL, agreement) and reports."""
