"""The segmentation pipeline: one module per stage, in data-flow order, free of Ray.

load -> preprocess -> model -> postprocess -> export; ``plan`` decides which model
passes a request needs and ``run`` chains the stages in one process.
"""
