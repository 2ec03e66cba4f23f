"""Per-neuron activation statistics (moments, sparsity, histogram, top contexts) of a layer."""

from intraneuron.analyses.neuron_stats.analysis import NeuronStatsAnalysis

__all__ = ["NeuronStatsAnalysis"]
