"""Data: storage through fsspec, shard manifests, image decoding and the training pipeline."""
