"""drprune: turn a large pretrained LM into a smaller one that is still good."""

__version__ = "0.1.0"
