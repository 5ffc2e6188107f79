"""nnU-Net v2 results folders (and TotalSegmentator's task folders): read safely, run nnU-Net's own
preprocessing and sliding window with a PTQLogic :class:`~PTQLogic.engines.base.Engine` as the network.

``folder``: validate dataset.json/plans.json/folds against allow-lists; ``checkpoint``: safe
``torch.load``; ``network``: build the dynamic_network_architectures network; ``predict``: nnU-Net's
inference with engines; ``model_dir``: quantize into / segment from a model folder; ``parts``: merge
several part folders (TotalSegmentator "total") into one named label map.
"""
