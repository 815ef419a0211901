"""One whole learner step captured in a CUDA graph and replayed (train.cuda_graph).

A learner step at the paper's sizes launches thousands of small kernels; on a fast GPU the host cannot launch them as
fast as the GPU runs them. Captured once, the step replays as one launch. What the capture needs, and the agent
provides: no random draw inside the step (its draws are inputs, `Q2RLAgent._draws`), optimisers that keep their step
counts on the GPU (capturable Adam), no host synchronisation inside, and the same input shapes every step.

The first `warmup` calls run eagerly on a side stream (the optimisers create their state, cuBLAS its workspaces,
torch.compile its kernels), the same stream the capture then records on (cuBLAS keeps a workspace per stream: one
first made inside the capture would be capture-unsafe set-up); the next one captures the step and replays it; every
later call copies its inputs into the graph's input tensors and replays. Each call is one real step. Inputs of another
structure or shape capture again. What the graph holds is fixed at capture: the tensors it reads and writes (weights
and optimiser states must be written in place, as loading them is; replaced ones need `reset`) and plain numbers such
as the learning rates (a changed learning rate needs `reset` too). A capture that fails raises an error naming the
switch to turn off; the graph is forgotten, so a caller that goes on warms up and tries again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree


class StepGraph:
    """fn(*args) -> tensor, run through a CUDA graph after `warmup` eager calls (see the module's docstring)."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"a CUDA graph needs at least one eager warm-up call, got warmup={warmup}")
        self.fn = fn
        self.warmup = warmup
        self.captures = 0
        self.stream: torch.cuda.Stream | None = None  # warm-up and capture stream, made at the first call
        self.reset()

    def reset(self) -> None:
        """Forget the graph: the next calls warm up and capture again. Needed whenever a tensor the step reads or
        writes is replaced rather than written in place (e.g. optimiser states loaded from a checkpoint)."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None
        self.static_args: tuple = ()
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None
        self.eager_calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *args: object) -> torch.Tensor:
        leaves, spec = pytree.tree_flatten(args)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        signature = (
            spec,
            tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("value", x) for x in leaves),
        )
        if self.signature is not None and signature != self.signature:
            self.reset()
        if self.graph is None:
            if any(t.device.type != "cuda" for t in tensors):
                raise ValueError("a CUDA graph step takes CUDA tensors only")
            if self.eager_calls < self.warmup - 1:
                self.eager_calls += 1
                return self._eager(args)
            if self.eager_calls == self.warmup - 1:
                # The last warm-up runs on the copies the graph will read, so that the capture meets nothing new.
                self.eager_calls += 1
                statics = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
                self.static_args = pytree.tree_unflatten(statics, spec)
                self.inputs = [leaf for leaf in statics if isinstance(leaf, torch.Tensor)]
                self.signature = signature
                return self._eager(self.static_args)
            try:
                self._capture()
            except Exception as exc:
                self.reset()
                raise RuntimeError(
                    f"capturing the learner step in a CUDA graph failed ({type(exc).__name__}: {exc}); "
                    "train.cuda_graph=false runs it without"
                ) from exc
        for static, new in zip(self.inputs, tensors, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.output.clone()

    def _stream(self) -> torch.cuda.Stream:
        """The side stream the warm-up runs on and the capture records on (one: cuBLAS keeps a workspace per stream)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _eager(self, args: tuple) -> torch.Tensor:
        """One step run eagerly on a side stream, as torch's graph-capture warm-up asks."""
        side = self._stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> None:
        """Record the step on the static inputs (recorded, not run: the replay that follows runs it)."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the learner service's other thread may use the GPU meanwhile (transitions into the buffer's
        # copy, weights out), which a process-wide capture would refuse.
        with torch.cuda.graph(graph, stream=self._stream(), capture_error_mode="thread_local"):
            output = self.fn(*self.static_args)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"a CUDA graph step must return one tensor, got {type(output).__name__}")
        self.graph, self.output = graph, output
        self.captures += 1
