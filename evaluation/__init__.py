"""Measuring super-resolution quality: metrics, baselines, the photo corpus and `s3diff evaluate`.

Nothing here is part of the service; training imports the metrics for its perceptual loss.
"""
