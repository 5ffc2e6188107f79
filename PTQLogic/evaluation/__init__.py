"""Dice, FP32-vs-INT8 agreement, label-map pairing, and benchmark report files."""
