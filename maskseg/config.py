"""Frozen run configurations; every default of the library and the CLI lives here, once."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError

DEFAULT_MODEL = "maskrcnn_resnet50_fpn"
DEFAULT_WRITERS: tuple[str, ...] = ("coco", "results", "overlay")
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".heic",
     ".heif"}
)
# --uint16: how 16-bit (and 12-bit-in-16) pixels become 8-bit (maskseg.decode.to_uint8).
UINT16_MODES: tuple[str, ...] = ("range", "shift", "percentile")
DEFAULT_UINT16 = "range"
# Video containers among the inputs (told apart from images by their content when read; maskseg.video).
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm"})
# Pillow's own decompression-bomb threshold: images above it are refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
# Files larger than this are not read into memory (a 90 MP PNG is well under it).
MAX_FILE_BYTES = 512 * 1024 * 1024
# List files and stdin lists longer than this are refused rather than read without bound.
MAX_LIST_ENTRIES = 10_000_000
MAX_LIST_BYTES = 1024**3
# A list-file line longer than this is not a path (Linux allows 4,096 bytes): the list is refused.
MAX_LIST_LINE_BYTES = 65_536


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build and how it sees images.

    ``min_size``/``max_size`` are torchvision's resize: the short side is scaled to ``min_size`` unless
    the long side would pass ``max_size``. ``None`` keeps what the weights or checkpoint say.
    """

    name: str = DEFAULT_MODEL
    weights: str | None = None
    device: str = "auto"
    min_size: int | None = None
    max_size: int | None = None
    score_thresh: float = 0.5
    max_dets: int = 100
    channels_last: bool = True
    backend: str = "torch"  # torch | onnxruntime | tensorflow (see maskseg.backends)
    labels: str | None = None  # a label map file (TF Object Detection API .pbtxt) naming the classes
    threads: int | None = None  # intra-op threads of the backend; None keeps the runtime's default
    precision: str = "fp32"  # fp32 | fp16 | bf16: fp16/bf16 autocast the torch backend on a CUDA GPU
    compile: bool = False  # torch.compile the torch backend's backbone (each new input size compiles once)


# --tile auto: images whose long side passes AUTO_TILE_TRIGGER (twice torchvision's default max_size of
# 1333: past it the model shrinks the image more than 2x and small objects fall under its smallest
# anchors) are cut into AUTO_TILE_SIZE tiles; smaller images run whole.
AUTO_TILE_SIZE = 1024
AUTO_TILE_TRIGGER = 2 * 1333
# --tile-full: the whole image, downscaled so its long side is this, runs beside the tiles.
TILE_FULL_SIDE = 1333
# With --tile, a TIFF stored in tiles or strips of at most this many pixels each is read by region
# (maskseg.regions), never decoded whole; larger blocks (a TIFF in one strip) are decoded whole as usual.
REGION_MAX_BLOCK_PIXELS = 1 << 24
# Decoded TIFF tiles kept per image read by region, so neighbouring model tiles (which overlap) and the
# --tile-full strips do not decode the same TIFF tile again: about one row of 256 px tiles at 20000 px.
REGION_CACHE_BYTES = 64 * 2**20
# The overlay of an image read by region is drawn on the image downscaled to this long side (drawing
# on the whole would decode it whole: 1.2 GB at 20000 x 20000).
REGION_OVERLAY_SIDE = 4096


@dataclass(frozen=True)
class TileConfig:
    """Sliced inference (``maskseg.tiling``).

    ``size``: tile side in pixels; ``None`` runs every image whole; ``0`` is ``--tile auto`` (tiles of
    ``AUTO_TILE_SIZE`` for images whose long side passes ``AUTO_TILE_TRIGGER``). ``overlap``: fraction of a
    tile shared with its neighbour. ``full``: also run the whole image downscaled to ``TILE_FULL_SIDE``.
    Merging: parts of one object cut by a tile edge are joined when their masks agree inside the shared
    band (IoU >= ``join_iou``); duplicates are grouped when their masks' IoU reaches ``match_iou``, or,
    for a fragment cut by a tile edge, intersection over the smaller reaches ``match_ios`` (see
    ``maskseg.tiling``: a group keeps its best whole view and unites its fragments).
    """

    size: int | None = None
    overlap: float = 0.2
    full: bool = False
    join_iou: float = 0.5
    match_ios: float = 0.5
    match_iou: float = 0.5

    def __post_init__(self) -> None:
        if self.size is not None and self.size != 0 and self.size < 32:
            raise UsageError(f"--tile {self.size}: tiles must be at least 32 pixels, or auto")
        if not 0.0 <= self.overlap <= 0.9:
            raise UsageError(f"--tile-overlap {self.overlap}: expected a fraction from 0 to 0.9")


def parse_uint16(text: str) -> str:
    """``--uint16``: one of ``UINT16_MODES``."""
    mode = text.strip().lower()
    if mode not in UINT16_MODES:
        raise UsageError(f"--uint16 {text}: expected one of {', '.join(UINT16_MODES)}")
    return mode


def parse_tile(text: str | None) -> int | None:
    """``--tile``: a tile side in pixels, ``auto`` (0) or nothing (None: images run whole)."""
    if text is None or text.strip().lower() in ("", "none", "off"):
        return None
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 32:
        raise UsageError(f"--tile {text}: expected a tile side of at least 32 pixels, or auto")
    return value


@dataclass(frozen=True)
class FrameSelect:
    """Which frames of a video run (``maskseg.video``): every ``stride``-th, or (``fps`` set) about
    ``fps`` per second of video time."""

    stride: int = 1
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise UsageError(f"--frame-stride {self.stride}: expected a whole number of at least 1")
        if self.fps is not None and self.fps <= 0:
            raise UsageError(f"--fps {self.fps}: expected a positive number of frames per second")


@dataclass(frozen=True)
class EngineConfig:
    """Where the model runs: ``local`` (this process) or ``ray`` (a Ray Data pipeline).

    ``address`` is the Ray cluster (None starts a local Ray); ``workers`` model actors, each with
    ``gpus_per_worker`` GPUs and ``threads_per_worker`` torch threads.
    """

    name: str = "local"
    address: str | None = None
    workers: int = 2
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1


# Douglas-Peucker distance (px) for polygon outputs; measured on the demo's 393 masks (benchmarks/polygon_iou.py):
# mask IoU of the polygon against the RLE mean 0.988, 5th percentile 0.972, 83 vertices a mask (0: 0.997, 380).
DEFAULT_POLYGON_TOLERANCE = 0.75


@dataclass(frozen=True)
class WriterOptions:
    """Settings writers read from ``RunContext.options``.

    ``polygon_tolerance``: simplification in pixels of the polygon outputs (polygons, yolo, labelstudio).
    ``labelstudio_root``: the folder Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT`` names; task image URLs
    are paths relative to it (None: the folder above the inputs' common folder).
    """

    polygon_tolerance: float = DEFAULT_POLYGON_TOLERANCE
    labelstudio_root: str | None = None


@dataclass(frozen=True)
class PredictConfig:
    """Everything one ``predict`` run needs besides its inputs and output folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int | None = None  # None: chosen for the device (maskseg.batching.auto_batch_size)
    mask_thresh: float = 0.5
    classes: tuple[str, ...] = ()
    writers: tuple[str, ...] = DEFAULT_WRITERS
    decode_workers: int = 2
    prefetch: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    recursive: bool = True
    overwrite: bool = False
    checkpoint_seconds: float = 300.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    shard: tuple[int, int] | None = None  # (k, n): this run takes shard k of n (1-based), see --shard
    tile: TileConfig = field(default_factory=TileConfig)
    frames: FrameSelect = field(default_factory=FrameSelect)
    uint16: str = DEFAULT_UINT16
    tiff_pages: bool = False  # every page of a multi-page TIFF as its own image (maskseg.pages)
    # With tiling, TIFFs stored in tiles or strips are read by region (maskseg.regions) and are not held to
    # max_pixels; False decodes them whole like any image (the benchmarks' comparison switch).
    tiff_regions: bool = True
    writer_options: WriterOptions = field(default_factory=WriterOptions)
    agnostic_nms: float | None = None  # mask IoU above which a lower-scoring detection of another class is dropped


@dataclass(frozen=True)
class ExportConfig:
    """What ``maskseg export`` writes: ``model`` (its weights, input size, ``max_dets`` and default
    ``score_thresh``) as ``format`` at ONNX ``opset``. ``check`` runs the exported file once on each of
    ``check_images`` (real photos; empty: the repository's sample_images) and compares it with torch."""

    model: ModelConfig = field(default_factory=ModelConfig)
    format: str = "onnx"
    opset: int = 17
    check: bool = True
    check_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``train`` run needs besides its data and run folder.

    ``weights``: None trains from scratch, ``"torchvision"`` starts from the model's published COCO
    weights, anything else is a weights file (a maskseg checkpoint brings its own architecture). Box and
    mask predictors are replaced when the class count differs. ``min_size``/``max_size`` are the
    evaluation and prediction input size (None: the model's); ``train_sizes`` are short sides picked at
    random per training image (scale jitter; empty: ``min_size`` only). ``lr_steps`` are epochs at which
    the ``step`` schedule multiplies the lr by ``lr_gamma`` (empty: at 2/3 and 8/9 of the epochs).
    ``trainable_layers`` counts ResNet stages from the top (0-5; None: all from scratch, 3 from weights).
    ``val_split`` holds out that fraction of the images, the last ones in the file's order.
    ``checkpoint_every`` also writes last.pt every that many steps (0: at each epoch's end only).
    """

    model: str = DEFAULT_MODEL
    arch_kwargs: dict = field(default_factory=dict)
    weights: str | None = None
    epochs: int = 12
    batch_size: int = 2
    optimizer: str = "adamw"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    lr_schedule: str = "cosine"
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    clip_grad: float | None = 10.0
    hflip: float = 0.5
    vflip: float = 0.0
    transpose: float = 0.0
    color_jitter: float = 0.0
    copy_paste: float = 0.0
    min_size: int | None = None
    max_size: int | None = None
    train_sizes: tuple[int, ...] = ()
    trainable_layers: int | None = None
    freeze_backbone: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    workers: int = 2
    val_split: float = 0.0
    eval_every: int = 1
    eval_score_thresh: float = 0.05
    score_thresh: float = 0.5
    mask_thresh: float = 0.5
    checkpoint_every: int = 0
    export_int8: bool = False


# Annotation and results JSON files larger than this are refused before they are read (hostile inputs).
MAX_JSON_BYTES = 2 * 1024**3
EVAL_IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
# COCO evaluation wants the low-score tail of detections (detectron2 tests at 0.05); predict keeps 0.5.
EVAL_SCORE_THRESH = 0.05


def _eval_predict_config() -> PredictConfig:
    return PredictConfig(model=ModelConfig(score_thresh=EVAL_SCORE_THRESH), writers=("coco", "results"))


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` computes, and how the model runs when it segments the dataset's images itself.

    ``max_dets`` is COCOeval's largest maxDets (thresholds ``[1, 10, max_dets]``). ``fail_metric`` is
    ``TYPE`` or ``TYPE/STAT`` (``segm``, ``bbox/AP50``); ``None`` means segm AP when segm is evaluated,
    else bbox AP. ``predict`` is used only for ``images=`` runs.
    """

    iou_types: tuple[str, ...] = EVAL_IOU_TYPES
    max_dets: int = 100
    fail_under: float | None = None
    fail_metric: str | None = None
    predict: PredictConfig = field(default_factory=_eval_predict_config)


def parse_batch_size(text: str) -> int | None:
    """``--batch-size``: a positive whole number, or ``auto`` (None: chosen for the device)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--batch-size {text}: expected a positive whole number or auto")
    return value
