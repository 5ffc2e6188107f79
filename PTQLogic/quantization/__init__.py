"""Quantization beyond ModelOpt's defaults: Q/DQ placement passes for CPU INT8 chains, the graph rewrites
they need, and the accuracy guard (sensitive layers kept in FP32)."""
