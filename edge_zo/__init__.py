"""edge-zo: zeroth-order fine-tuning of extremely sparse sensitive weights on llama.cpp."""

__version__ = "0.1.0"
