"""Training data: image + caption records and the Dataset the training loop iterates."""

from personalize.data.dataset import ImageCaptionDataset, shuffle_caption_tags
from personalize.data.folders import IMAGE_EXTENSIONS
from personalize.data.records import (
    DataError,
    DatasetRow,
    Record,
    load_records,
    read_image,
    split_records,
)
from personalize.data.transforms import load_image, prepare_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetRow",
    "ImageCaptionDataset",
    "Record",
    "load_image",
    "load_records",
    "prepare_image",
    "read_image",
    "shuffle_caption_tags",
    "split_records",
]
