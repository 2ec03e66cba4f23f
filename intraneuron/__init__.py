"""intraneuron: neuron-level interpretability experiments on transformer language models."""

__version__ = "0.1.0"
