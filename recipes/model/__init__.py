"""The model and its pieces.

``speaker_model``: heads, phrase branch, the one embedding model, the fusion's application and
the inference interface (copied whole into exported folders); ``modules``: the WavLM encoder that
loads pretrained weights, L2-SP and the margin losses.
"""
