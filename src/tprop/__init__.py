"""tprop: train recurrent language models by block target propagation, beside truncated BPTT."""

__version__ = "0.1.0"
