"""Datasets, augmentation and loaders. Never imports the model: matching happens in the loss."""

import os

# albumentations 2.x asks PyPI for a newer version when imported (up to 2 s, and a warning, on an offline
# machine): this framework never goes to the network at run time. Set here, before any module of the
# package imports albumentations; a user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
