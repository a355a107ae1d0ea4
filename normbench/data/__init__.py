"""CIFAR-10: the files on disk (files.py), the tensors in memory and each epoch's batches
(tensors.py), and synthetic data in the same layout for tests (synthetic.py)."""
from normbench.data.files import (ALL_FILES, DOWNLOAD_TIMEOUT_S, FOLDER, MANIFEST, MIRROR, TEST_FILES, TRAIN_FILES,
                                  DataIdentity, data_identity, decode_mirror, ensure_cifar10, ensure_cifar10_identity,
                                  fingerprint_of, is_unfilled, load_batch, load_split, md5_of, official_md5s,
                                  present_identity, verify, verify_identity, write_manifest)
from normbench.data.synthetic import synthetic_cifar, write_cifar_layout
from normbench.data.tensors import MEAN, STD, Cifar10, EpochPlan, Normalizer, balanced_subset, crop_flip, load_cifar10

__all__ = ["ALL_FILES", "DOWNLOAD_TIMEOUT_S", "FOLDER", "MANIFEST", "MIRROR", "TEST_FILES", "TRAIN_FILES", "DataIdentity",
           "data_identity", "decode_mirror", "ensure_cifar10", "ensure_cifar10_identity", "fingerprint_of", "is_unfilled",
           "load_batch", "load_split", "md5_of", "official_md5s", "present_identity", "verify", "verify_identity",
           "write_manifest", "synthetic_cifar", "write_cifar_layout", "MEAN", "STD", "Cifar10", "EpochPlan", "Normalizer",
           "balanced_subset", "crop_flip", "load_cifar10"]
