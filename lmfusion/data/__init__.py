"""Image-caption data: messy files in, clean ``[3, size, size]`` RGB tensors + captions out.

``datasets`` and ``webdataset`` are imported lazily by the readers that need them, so
importing this package stays cheap.
"""

from .formats import (
    CaptionRecord,
    DataStats,
    HFDiskCaptions,
    ImageFolderCaptions,
    ImageFolderWriter,
    NoUsableDataError,
    WebDatasetCaptions,
    collate_records,
    detect_format,
    expand_shards,
    open_caption_dataset,
    read_records,
)
from .images import (
    BadImageError,
    load_rgb_image,
    load_rgb_pil,
    make_grid,
    save_image_grid,
    to_pil,
    verify_image,
)
from .shapes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    caption_for,
    generate_shapes_dataset,
    render_scene,
    sample_scene,
    scene_for_index,
)
from .shapes_oracle import (
    DetectedObject,
    parse_shapes_caption,
    parse_shapes_image,
    score_caption_faithfulness,
)

__all__ = [
    "BadImageError",
    "COLOURS",
    "CaptionRecord",
    "DataStats",
    "DetectedObject",
    "HFDiskCaptions",
    "ImageFolderCaptions",
    "ImageFolderWriter",
    "NoUsableDataError",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "WebDatasetCaptions",
    "caption_for",
    "collate_records",
    "detect_format",
    "expand_shards",
    "generate_shapes_dataset",
    "load_rgb_image",
    "load_rgb_pil",
    "make_grid",
    "open_caption_dataset",
    "parse_shapes_caption",
    "parse_shapes_image",
    "render_scene",
    "sample_scene",
    "save_image_grid",
    "scene_for_index",
    "score_caption_faithfulness",
    "to_pil",
    "verify_image",
]
