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
On the CPU, freezing gives each compiled shape its own prepacked copy of the weights (measured: a
112 MB fp32 resnet block added 116-118 MB of RSS per compiled shape), one more reason to compile a
few shapes rather than every size seen; and weights changed after warm-up are not seen by the
frozen graphs (build a new pipeline instead).
"""
from __future__ import annotations

import contextlib
import logging
import time
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
        return torch._inductor.config.patch(freezing=True) if self.plan.freezing else contextlib.nullcontext()

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
            if not new or self.plan.required:
                raise
            log.warning("compiling %s failed; it runs eager from now on: %s", self.name, err)
            self.enabled = False
            return self.fn(*args)
        if new:
            self.compile_seconds[key] = time.perf_counter() - start
        # A CUDA graph's output lives in its static pool and is overwritten by the next replay.
        return output.clone() if self.plan.cudagraphs else output


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
