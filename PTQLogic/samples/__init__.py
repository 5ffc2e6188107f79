"""Phantoms with known labels, sample-model training, and the shipped sample models (data/)."""
