"""normbench: what happens to BatchNorm and its alternatives when the batch gets small."""
__version__ = "0.1.0"
