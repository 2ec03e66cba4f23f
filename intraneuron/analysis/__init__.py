"""The two-fold intra-neuronal analysis of Pichat et al. (2025) on plain arrays."""
