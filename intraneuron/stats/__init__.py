"""Statistics shared by analyses: permutation nulls, summaries over neurons, multiple testing."""
