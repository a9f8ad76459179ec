"""Scoring a model on trial lists.

Cosine scoring and score normalization (``scoring``), the fusion (``fusion``), metrics, embedding
and caching (``verification``), reports, and model folders from elsewhere (``pretrained``).
"""
