"""Pictures: training curves and retrieval grids."""
