"""Reading nnU-Net v2 results folders: plans, dataset.json, checkpoints, the network."""
