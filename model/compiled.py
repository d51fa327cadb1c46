"""torch.compile for the three network calls of S3Diff (VAE encoder, UNet, VAE decoder), one
static graph per input shape, compiled only while warming up (docs/model.md, "Compiled fast path").

Modulation as data: each call takes its (B, blocks, r, r) modulation as an argument and puts it
on the slot inside the compiled region (S3DiffModel.encoder_call/unet_call), so the graph reads
it as an input. One graph serves every image and every noise/blur; a CUDA graph copies it into
its static input buffer instead of baking one image's modulation in.

Shape policy. Graphs are static (`dynamic=False`):
- Images larger than a tile both ways are cut into tiles of one shape, so they always hit the
  graph compiled for the tile (one side within a tile gives tiles of that side's length).
- Smaller images come in as many shapes as there are sizes. Dynamic shapes were tried (tiny
  model, inductor with freezing): after an 8x16 latent the decoder still recompiled for 8x8,
  40x32 and 96x96, since guards specialise on sizes; and CUDA graphs need static shapes anyway.
  Padding into a few buckets would change the output (GroupNorm statistics and the reflect
  padding see the extra pixels), so a result would depend on its bucket.
So shapes are compiled only at warm-up (`compiling`): the tile, plus the sizes the caller
configures. Any other shape runs eager: a new request shape never waits minutes for a compile.
On the CPU the graphs are frozen (weights become constants) but not prepacked for oneDNN: prepacked
weights were a second copy per compiled shape (a 112 MB fp32 resnet block added 116-118 MB of RSS
per shape) and cannot be pickled, so no compile cache could keep such a graph. Weights changed
after warm-up are not seen by the frozen graphs (build a new pipeline instead).

Persistence (ArtifactCache): after a warm-up that compiled, torch.compiler's cache artifacts
(inductor's compiled graphs and C++ kernels) are saved to one file whose name is a hash of
everything that decides the code: torch version, CPU flags, device, dtype, the warm-up shapes and
the weights' id. The next start loads that file before compiling, so inductor skips code
generation and the C++ compiler; Dynamo's and AOTAutograd's tracing and the freezing passes are
paid again (AOTAutograd's cache refuses frozen graphs). The same hash is
torch.compiler's `cache_key_tag`, so entries built for other weights or flags are never matched.
A file that cannot be read, or a compile that fails with the cache, is logged, dropped and
compiled again from scratch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .runtime import CompilePlan

log = logging.getLogger(__name__)

Signature = tuple


def signature(args: Iterable[Any]) -> Signature:
    """What selects a graph: each tensor argument's shape and dtype (other values as they are)."""
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


class CompiledCall:
    """`fn` compiled per input signature. New signatures compile only while `compiling` is set
    (warm-up); outside it they run `fn` eagerly. `enabled` False runs everything eagerly."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], plan: CompilePlan):
        self.name, self.fn, self.plan = name, fn, plan
        self.compiled = torch.compile(fn, dynamic=False, mode=plan.mode)
        self.compile_seconds: dict[Signature, float] = {}  # compile + first run, per shape
        self.compiling = False
        self.enabled = True

    def ready(self, *args: Any) -> bool:
        """Whether this call would run compiled (else eagerly)."""
        if not self.enabled:
            return False
        known = signature(args) in self.compile_seconds
        return known or (self.compiling and len(self.compile_seconds) < torch._dynamo.config.recompile_limit)

    def _settings(self) -> contextlib.AbstractContextManager:
        # Dynamo reads the global flag when it traces (the per-compile `options` are seen by
        # inductor only, too late to turn parameters into constants), so it is set around calls.
        # No oneDNN weight prepacking: prepacked (mkldnn) constants are a second copy of the weights
        # per compiled shape and cannot be pickled, so inductor's FX graph cache skips such graphs
        # and every start recompiled from scratch; without it the frozen graphs read the module's
        # own weights and persist (see module docstring; the speed cost is in docs/performance.md).
        if not self.plan.freezing:
            return contextlib.nullcontext()
        return torch._inductor.config.patch({"freezing": True, "cpp.weight_prepack": False})

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.ready(*args):
            return self.fn(*args)
        key = signature(args)
        new = key not in self.compile_seconds
        start = time.perf_counter()
        try:
            with self._settings():
                if self.plan.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                output = self.compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # a compile failure; under "auto" run eager rather than fail
            if not new:
                raise
            output = self._recompile_without_caches(args, err)
            if output is None:
                if self.plan.required:
                    raise
                log.warning("compiling %s failed; it runs eager from now on: %s", self.name, err)
                self.enabled = False
                return self.fn(*args)
        if new:
            self.compile_seconds[key] = time.perf_counter() - start
        # A CUDA graph's output lives in its static pool and is overwritten by the next replay.
        return output.clone() if self.plan.cudagraphs else output

    def _recompile_without_caches(self, args: tuple, err: Exception) -> torch.Tensor | None:
        """A compile that failed may have read a stale or corrupt cache entry: compile once more
        with every compile cache off. None when that fails too."""
        log.warning("compiling %s failed (%s: %s); compiling it again with the compile caches off",
                    self.name, type(err).__name__, err)
        try:
            with self._settings(), torch._inductor.config.patch(force_disable_caches=True):
                return self.compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as again:  # noqa: BLE001 - reported by the caller
            log.warning("compiling %s without caches failed too: %s", self.name, again)
            return None


def make_calls(fns: dict[str, Callable[..., torch.Tensor]], plan: CompilePlan) -> dict[str, CompiledCall]:
    return {name: CompiledCall(name, fn, plan) for name, fn in fns.items()}


@contextlib.contextmanager
def compiling(calls: Iterable[CompiledCall]) -> Iterator[None]:
    """Warm-up: shapes seen inside compile."""
    calls = list(calls)
    for call in calls:
        call.compiling = True
    try:
        yield
    finally:
        for call in calls:
            call.compiling = False


@contextlib.contextmanager
def eager(calls: Iterable[CompiledCall]) -> Iterator[None]:
    """Run everything eagerly (e.g. the bench's eager rows on the same weights)."""
    calls = list(calls)
    before = [call.enabled for call in calls]
    for call in calls:
        call.enabled = False
    try:
        yield
    finally:
        for call, enabled in zip(calls, before):
            call.enabled = enabled


class ArtifactCache:
    """torch.compiler cache artifacts of one warm-up, persisted in `folder` under a hash of
    `key_parts` (whatever decides the compiled code). Never raises on a bad file: it is logged,
    removed and the warm-up compiles from scratch."""

    def __init__(self, folder: Path, key_parts: dict[str, Any]):
        self.key_parts = key_parts
        self.key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.path = Path(folder) / f"{self.key}.bin"
        self.meta_path = self.path.with_suffix(".json")

    def previous(self) -> dict[str, Any] | None:
        """What the warm-up that wrote the cache recorded (its seconds, cold or warm), if any."""
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None

    def load(self) -> bool:
        """Hot-load the saved artifacts into the compile caches; False when there are none or they
        cannot be read (the file is then removed and the reason logged)."""
        if not self.path.is_file():
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as err:  # noqa: BLE001 - any unreadable cache means: compile from scratch
            info, why = None, f"{type(err).__name__}: {err}"
        else:
            why = "torch could not deserialize it"
        if info is None:
            log.warning("compile cache %s is unreadable (%s); removing it and compiling from scratch", self.path, why)
            self.discard()
            return False
        return True

    def save(self, meta: dict[str, Any], artifacts: bool = True) -> None:
        """Write this process's artifacts (unless `artifacts` is False) and `meta` beside them,
        atomically: a crash leaves the old file or none."""
        try:
            files = [(self.meta_path, json.dumps({**meta, "key": self.key_parts}, indent=1, default=str).encode())]
            if artifacts:
                saved = torch.compiler.save_cache_artifacts()
                if not saved:
                    return
                files.insert(0, (self.path, saved[0]))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for path, data in files:
                partial = path.with_suffix(path.suffix + f".{os.getpid()}.part")
                partial.write_bytes(data)
                os.replace(partial, path)
        except Exception as err:  # noqa: BLE001 - a cache that cannot be written only costs the next start
            log.warning("could not save the compile cache to %s: %s", self.path, err)

    def discard(self) -> None:
        for path in (self.path, self.meta_path):
            with contextlib.suppress(OSError):
                path.unlink()

    @contextlib.contextmanager
    def tagged(self) -> Iterator[None]:
        """Compile under this key, so cache entries of other weights/flags/dtypes never match."""
        with torch.compiler.config.patch(cache_key_tag=self.key):
            yield


def cache_key_parts(device: torch.device, dtype: torch.dtype, plan: CompilePlan, shapes: list, weights_id: str) -> dict:
    """Everything that decides the compiled code and the constants frozen into it."""
    from .runtime import cpu_flags

    cpu = {"capability": torch.backends.cpu.get_cpu_capability(), **cpu_flags()}
    return {"torch": torch.__version__, "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu, "dtype": str(dtype), "mode": plan.mode, "freezing": plan.freezing,
            "shapes": shapes, "weights_id": weights_id}


def warm_up_persistent(calls: Iterable[CompiledCall], cache: ArtifactCache, shapes: list, run: Callable[[], None]) -> dict:
    """Run the warm-up `run` (which compiles `calls` for `shapes`) with the artifact cache: load
    it first, say on the console what is compiled and about how long it takes, save it after.
    Returns {"cache": "warm" | "cold", "seconds": ...}."""
    calls = list(calls)
    previous = cache.previous() if cache.path.is_file() else None
    warm = cache.load()
    what = f"{', '.join(call.name for call in calls)} for {len(shapes)} shape(s) {shapes}"
    if warm:
        previous = previous or {}
        if previous.get("warm_s"):
            expect = f"about {previous['warm_s']:.0f} s last time"
        elif previous.get("cold_s"):
            expect = f"a fraction of the {previous['cold_s']:.0f} s that compiling from scratch took"
        else:
            expect = "a fraction of a compile from scratch"
        log.info("compiling %s from the compile cache %s (%s)", what, cache.path, expect)
    else:
        log.info("compiling %s; no compile cache for them yet (%s), so this takes minutes on a small CPU "
                 "(3-7 min for one shape on 2 cores, the UNet most of it); the next start reuses it",
                 what, cache.path)
    start = time.perf_counter()
    with cache.tagged():
        run()
    seconds = round(time.perf_counter() - start, 1)
    meta = {**(previous or {}), "warm_s": seconds} if warm else {"cold_s": seconds}
    cache.save(meta, artifacts=not warm)  # a warm start rewrites only the timings
    log.info("compiled %s in %.0f s (%s cache)", what, seconds, "warm" if warm else "cold")
    return {"cache": "warm" if warm else "cold", "seconds": seconds}
