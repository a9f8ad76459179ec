"""The training and verification recipes and the helper modules they share."""
