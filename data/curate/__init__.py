"""Curation: raw video -> captioned, square face clips and a manifest, following FaceVid-1K's pipeline.

    python -m data.curate --input RAW_DIR --out OUT [--workers N] [thresholds ...]

Modules: frames (streaming decode, fps normalisation), faces (pluggable detector, tracking, crop),
quality (shot cuts and filter measures), captions (drafted captions, captioner hook), pipeline (one
video), runner (many videos: processes, resume, report). Needs the `curation` extra
(opencv-python-headless<5; scikit-image for the tests and the benchmark).
"""

from data.curate.captions import draft_caption, load_captioner
from data.curate.faces import CropWindow, FaceDetector, HaarFaceDetector, load_detector
from data.curate.frames import iter_frames, resample
from data.curate.pipeline import CurationConfig, VideoCurator, curate_video
from data.curate.runner import ConfigMismatch, list_inputs, run_curation

__all__ = [
    "ConfigMismatch",
    "CropWindow",
    "CurationConfig",
    "FaceDetector",
    "HaarFaceDetector",
    "VideoCurator",
    "curate_video",
    "draft_caption",
    "iter_frames",
    "list_inputs",
    "load_captioner",
    "load_detector",
    "resample",
    "run_curation",
]
