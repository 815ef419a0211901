"""`SimCamera`: the Camera interface (design §7) for the MuJoCo twin, rendering a named camera of the scene offscreen.

Each `read()` / `read_raw()` renders the current `data` once at the raw size of the camera's config (so the crop box
means the same pixels as on the real camera) and `read()` hands back `preprocess`'s crop-then-resize of it, exactly as
`RealSenseCamera` does. Frames are stamped with the simulation time (`data.time`) and a per-camera render counter.

Headless rendering needs an OpenGL backend. MuJoCo picks it from MUJOCO_GL once, when `import mujoco` runs;
`select_gl_backend` respects MUJOCO_GL when it is set, else tries EGL then OSMesa (shared/research/hardware-facts.md:
EGL works out of the box, OSMesa needs libosmesa6) and installs the first that opens a context, also when mujoco was
imported before without MUJOCO_GL (it would otherwise use GLFW, which needs a display).

Shadows and reflections are switched off after every `update_scene` (they make an 84x84 render ~30 ms instead of
~1 ms). Close the camera (or use it as a context manager): a renderer holds a GL context until it is freed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable

from robot_rl.config import CameraConfig
from robot_rl.hardware.camera import CameraError, Frame, check_crop, preprocess
from robot_rl.hardware.interfaces import ClosesOnExit

GL_BACKENDS = ("egl", "osmesa")
_selected: str | None = None


class GLBackendError(CameraError):
    """No OpenGL backend can render offscreen here."""


def _context_class(backend: str) -> type:
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    elif backend in ("glfw", "glx"):
        from mujoco.glfw import GLContext
    else:
        raise GLBackendError(f"MUJOCO_GL={backend!r} is not a backend this camera knows (egl, osmesa, glfw)")
    return GLContext


def _probe(backend: str) -> type:
    """The backend's GLContext class after opening and freeing a 1x1 context with it; raises on failure."""
    cls = _context_class(backend)
    ctx = cls(1, 1)
    try:
        ctx.make_current()
    finally:
        ctx.free()
    return cls


def select_gl_backend() -> str:
    """Choose the offscreen OpenGL backend once per process and make MuJoCo's Renderer use it; returns its name.

    MUJOCO_GL set: that one, no fallback (the user asked for it). Unset: EGL, else OSMesa; the choice is written to
    os.environ["MUJOCO_GL"] (for subprocesses and for a later `import mujoco`). Raises GLBackendError saying what
    each backend answered when none works.
    """
    global _selected
    if _selected is not None:
        return _selected
    requested = os.environ.get("MUJOCO_GL", "").strip().lower()
    candidates = (requested,) if requested else GL_BACKENDS
    errors = []
    for backend in candidates:
        try:
            cls = _probe(backend)
        except Exception as exc:  # ImportError, OSError, RuntimeError, the GL wrappers' own errors
            errors.append(f"{backend}: {type(exc).__name__}: {exc}")
            continue
        os.environ["MUJOCO_GL"] = backend
        _install(backend, cls)
        _selected = backend
        return backend
    how = f"MUJOCO_GL={requested}" if requested else "tried " + ", ".join(GL_BACKENDS)
    raise GLBackendError(
        f"no OpenGL backend can render offscreen ({how}): "
        + "; ".join(errors)
        + ". EGL needs libegl1 and a GPU or Mesa driver; OSMesa needs libosmesa6 (apt-get install libosmesa6)."
    )


def _install(backend: str, cls: type) -> None:
    """Make mujoco.Renderer create `cls` contexts when mujoco was imported under another MUJOCO_GL."""
    import mujoco  # noqa: F401  (after MUJOCO_GL is set when this is the first import)

    module = sys.modules.get("mujoco.rendering.classic.gl_context")
    if module is not None and getattr(module, "_MUJOCO_GL", backend) != backend:
        module.GLContext = cls


class SimCamera(ClosesOnExit):
    """A MuJoCo camera of the twin, read like a RealSense: `read()` gives cfg.out_size x cfg.out_size x 3 uint8 RGB.

    `cfg.name` names both the observation key and the MuJoCo camera (the scene defines "front" and "wrist"); the
    source fields of the config (serial, recording, record_to) and `freshness_s` do not apply to a render of the
    current state. Each read renders once: call it after the physics step whose result it should show.
    """

    def __init__(
        self,
        model: object,
        data: object,
        *,
        cfg: CameraConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        select_gl_backend()
        import mujoco

        self._mujoco = mujoco
        camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, cfg.name)
        if camera_id < 0:
            names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
            raise CameraError(f"camera {cfg.name}: the MuJoCo model has no camera of that name (it has {names})")
        check_crop(cfg.crop, width=cfg.width, height=cfg.height)
        # The offscreen buffer must hold the frame (MuJoCo's default is 640x480); growing it changes no physics.
        visual = model.vis.global_
        visual.offwidth = max(int(visual.offwidth), cfg.width)
        visual.offheight = max(int(visual.offheight), cfg.height)
        self._cfg = cfg
        self._data = data
        self._camera_id = camera_id
        self._clock = clock
        self._frame_number = 0
        try:
            self._renderer: mujoco.Renderer | None = mujoco.Renderer(model, height=cfg.height, width=cfg.width)
        except Exception as exc:
            raise GLBackendError(f"camera {cfg.name}: cannot create a MuJoCo renderer: {exc}") from exc

    @property
    def name(self) -> str:
        return self._cfg.name

    @property
    def config(self) -> CameraConfig:
        return self._cfg

    @property
    def frames_rendered(self) -> int:
        return self._frame_number

    def read_raw(self) -> Frame:
        """Render the current state: cfg.height x cfg.width x 3 uint8 RGB (read-only)."""
        renderer = self._renderer
        if renderer is None:
            raise CameraError(f"camera {self.name}: closed")
        flags = self._mujoco.mjtRndFlag
        renderer.update_scene(self._data, camera=self._camera_id)
        # update_scene resets the scene flags from the model's defaults: switch them off again every time.
        renderer.scene.flags[flags.mjRND_SHADOW] = False
        renderer.scene.flags[flags.mjRND_REFLECTION] = False
        image = renderer.render()  # a new array each call
        image.flags.writeable = False
        self._frame_number += 1
        return Frame(
            image=image,
            timestamp_s=float(self._data.time),
            frame_number=self._frame_number,
            received_s=self._clock(),
        )

    def read(self) -> Frame:
        """Render the current state and crop-then-resize it: out_size x out_size x 3 uint8 RGB (read-only)."""
        raw = self.read_raw()
        image = preprocess(raw.image, self._cfg.crop, self._cfg.out_size)
        image.flags.writeable = False
        return Frame(image=image, timestamp_s=raw.timestamp_s, frame_number=raw.frame_number, received_s=raw.received_s)

    def close(self) -> None:
        """Free the renderer and its GL context; idempotent."""
        renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the GL library may be gone already
            self.close()

    def __repr__(self) -> str:
        return f"SimCamera(name={self.name!r}, {self._cfg.width}x{self._cfg.height} -> {self._cfg.out_size})"


def twin_cameras(model: object, data: object) -> Callable[[CameraConfig], SimCamera]:
    """The `twin` of `hardware.camera.open_cameras` for this model and data: a SimCamera of the config's name."""
    return lambda cfg: SimCamera(model, data, cfg=cfg)


def render_size_for_speed(cfg: CameraConfig, *, min_crop: int | None = None) -> CameraConfig:
    """A copy of `cfg` scaled down so the crop box is about `min_crop` pixels (default: out_size * 2) on a side.

    The rendered scene and the crop's field of view stay the same; only fewer pixels are drawn (848x480 -> ~148x84
    for an 84x84 policy image: a few ms per render instead of tens). Never scales up.
    """
    target = cfg.out_size * 2 if min_crop is None else min_crop
    scale = min(1.0, target / min(cfg.crop.width, cfg.crop.height))
    if scale >= 1.0:
        return cfg

    def s(v: int, low: int = 1) -> int:
        return max(low, round(v * scale))

    width, height = max(16, s(cfg.width)), max(16, s(cfg.height))
    crop_w, crop_h = min(s(cfg.crop.width), width), min(s(cfg.crop.height), height)
    # Rounding may push the box a pixel past the frame: pull it back inside.
    crop = {
        "x": min(s(cfg.crop.x, 0), width - crop_w),
        "y": min(s(cfg.crop.y, 0), height - crop_h),
        "width": crop_w,
        "height": crop_h,
    }
    return CameraConfig.model_validate({**cfg.model_dump(), "width": width, "height": height, "crop": crop})


__all__ = ["GLBackendError", "SimCamera", "render_size_for_speed", "select_gl_backend", "twin_cameras"]
