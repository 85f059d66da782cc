"""autoregembed.release: what a run hands over: exports, their sentence-transformers layout and model card, inference and evaluation (DEVELOPERS.md maps each module)."""
