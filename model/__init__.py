"""PF-SAM BUS model package: encoders, heads, the multi-task network, checkpoints and inference."""
CLASS_NAMES = ("normal", "benign", "malignant")
__version__ = "0.9.0"  # the product (process.py --version); the model files carry their own format_version
