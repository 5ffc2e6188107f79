"""Preprocessing, the sliding window (CPU and GPU-resident), back to the input grid; nnU-Net's predictor."""
