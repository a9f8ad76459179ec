"""Training pieces the Brain uses.

Noise augmentation read by the loader's workers, phrase batches, learning-rate schedules, and
checkpoints published only once complete.
"""
