"""Vision Instruct Recipes: scale-invariant LLaVA-1.5 fine-tuning (Llama-3 + CLIP + MLP projector)."""

__version__ = "0.1.0"
