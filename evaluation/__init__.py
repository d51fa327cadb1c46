"""Measuring super-resolution quality: metrics, baselines, the photo corpus and `s3diff evaluate`.

Nothing here is part of the service; training imports the metrics for its perceptual loss.
"""

# What `s3diff evaluate` can run and how it makes the LR input; here, so the CLI can name them
# without importing torch.
METHODS = ("s3diff", "bicubic", "realesrgan")
DEGRADATIONS = ("clean", "realistic")
