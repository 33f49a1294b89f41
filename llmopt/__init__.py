"""llmopt: make a Hugging Face causal LM smaller and faster, and measure what it cost."""

__version__ = "0.1.0"
