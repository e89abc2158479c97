"""Training: detector-agnostic LightGlue fine-tuning (``fmr train lightglue``); datasets, labels, losses.

Modules: :mod:`labels` (glue-factory GT from homography or depth + pose), :mod:`data` (pair sources, the
multi-detector feature cache, batching), :mod:`loss` (deep-supervised NLL + confidence BCE),
:mod:`lightglue` (the training loop). Nothing here imports rclpy.
"""
