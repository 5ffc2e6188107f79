"""nnU-Net models segmented the way nnunetv2 does, with our engines inside its predictor."""
