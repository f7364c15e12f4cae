"""Datasets: emoji font rendering, image-folder import, and the deterministic batch pipeline."""

from .dataset import ImageTextDataset, write_dataset_folder
from .emoji import build_emoji_dataset, find_emoji_font
from .folder import import_image_folder

__all__ = [
    "ImageTextDataset",
    "build_emoji_dataset",
    "find_emoji_font",
    "import_image_folder",
    "write_dataset_folder",
]
