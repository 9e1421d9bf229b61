"""PF-SAM BUS model package: encoders, heads, the multi-task network, checkpoints and inference."""
CLASS_NAMES = ("normal", "benign", "malignant")
