"""Data preparation: DeepMine / SdSV / TdSV manifests and the synthetic corpus."""
