"""What a run leaves behind: artifact paths and their loaders, figures, cross-run comparison."""
