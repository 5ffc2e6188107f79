"""Quantization beyond ModelOpt's defaults: the accuracy guard (and Q/DQ placement)."""
