"""Q/DQ placement passes of the project (CPU-oriented INT8 chains) and the graph rewrites they need."""
