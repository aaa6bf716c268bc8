"""The training pairs, by what each part is: `core.index` (the row index over CSV or webdataset shards),
`core.decoding` (image bytes to RGB, bad samples), `core.datasets` (torch datasets and collate functions).
Importing from `core.data` keeps working for every name."""

from core.datasets import (
    FOLDER_IMAGE_EXTS,
    ImageListDataset,
    PairDataset,
    collate_images,
    collate_pairs,
    read_image_folder,
)
from core.decoding import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, PIL_FORMATS, BadSample, decode_image, load_image
from core.index import IMAGE_EXTS, PairIndex, build_index

__all__ = [
    "FOLDER_IMAGE_EXTS", "IMAGE_EXTS", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "PIL_FORMATS", "BadSample",
    "ImageListDataset", "PairDataset", "PairIndex", "build_index", "collate_images", "collate_pairs",
    "decode_image", "load_image", "read_image_folder",
]
