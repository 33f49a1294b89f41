"""`llmopt export`: a checkpoint as a GGUF file for llama.cpp, GPTQ layers mapped onto GGML blocks."""

from llmopt.export.options import ExportOptions
from llmopt.export.writer import export

__all__ = ["ExportOptions", "export"]
