"""Training steps replayed as a CUDA graph: the proxy epoch's fast path on a GPU.

A small network's training step on a GPU is bound by the host launching its kernels, not
by the GPU's work: the zoo's LeNet took 2.6 ms a step at batch 128 launched from Python and
0.63 ms replayed, its zoo ResNet 5.2 ms and 1.4 ms (bench/proxy_epoch.py, H200). Captured
once as a CUDA graph, a step's forward, backward and optimizer update replay with one launch.

`GraphedBatches` does this without changing the training code. It wraps an epoch's batches
and is handed, like them, to the loop that trains: a LEMUR module's own `learn(train_data)`
or the worker's default loop.

1. Warm-up: the first WARMUP_STEPS batches go to the loop as they are and run eagerly, on a
   side stream. After each, the host state that a graph would freeze is compared: the
   Python, NumPy and torch CPU random states, and the plain attributes of the model's
   modules and of the optimizers and schedulers they hold. A loop that changes any of them
   from one step to the next (a step counter, host-side randomness, a per-step schedule)
   runs eagerly to the end.
2. Capture: the next full batch is copied into static tensors and handed to the loop while
   the stream captures. When the loop asks for the batch after it, the capture ends: one
   iteration of the loop's body, and only that, is the graph.
3. Replay: the captured batch and every later full batch are copied into the static tensors
   and replayed; the loop does not see them. A last, smaller batch goes to the loop as
   usual, eagerly. Every batch gets exactly one step, in order, and what the loop does after
   its `for` runs once, as it would.

Replayed batches never reach the loop, so only a loop that would run its body once for every
batch is captured: one plain `for` over the batches, nothing in its body that stops, skips or
carries a host value to the next batch (`loop_shape` reads the source). A loop that stops
right after the captured batch keeps that step.

A capture that fails (a host sync such as `.item()` or `if tensor:`, a host tensor copied
in, an optimizer that is not capturable) raises out of the loop. `run_epoch` then ends the
capture and calls the loop again on the batches from that one on, eagerly (so code before
and after the loop's `for` runs a second time in that case).
"""
from __future__ import annotations

WARMUP_STEPS = 3
MIN_REPLAYS = 2  # an epoch with fewer full batches than warm-up + capture + this runs eagerly


def _token(v, depth: int = 0):
    """A comparable summary of one attribute: its value where it is plain, else its identity,
    with the hyperparameters of optimizers and the position of schedulers."""
    import torch

    if v is None or isinstance(v, (bool, int, str, bytes)):
        return v
    if isinstance(v, float):
        return repr(v)  # NaN equals itself
    if isinstance(v, torch.optim.Optimizer):
        return ("optimizer", id(v), tuple(tuple(sorted((k, _token(x, depth + 1)) for k, x in g.items() if k != "params"))
                                          for g in v.param_groups))
    if isinstance(v, torch.optim.lr_scheduler.LRScheduler):
        return ("scheduler", id(v), v.last_epoch)
    if isinstance(v, (list, tuple)) and depth < 2:
        return (type(v).__name__, len(v), tuple(_token(x, depth + 1) for x in v[:64]))
    if isinstance(v, dict) and depth < 2:
        return ("dict", len(v), tuple((str(k), _token(x, depth + 1)) for k, x in list(v.items())[:64]))
    return (type(v).__name__, id(v))


def loop_shape(learn) -> str:
    """Why `learn`'s source is not one plain `for` over its batches, or "" when it is.

    Replayed batches never reach the loop, so the loop must be one that would run its body once
    per batch to the end: `for x, y in data:` (or `enumerate(data)` with the index unused), with no
    `break`, `continue`, `return` or `yield` in the body, and the batches used nowhere else (no
    `next`, `zip`, `islice`). Anything else, or a source that cannot be read, runs eagerly."""
    import ast
    import inspect
    import textwrap

    try:
        fn = getattr(learn, "__func__", learn)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return "its source cannot be read"
    func = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    args = [a.arg for a in func.args.args] if func is not None else []
    batch_args = args[1:] if inspect.ismethod(learn) else args  # a bound method's first is self
    if not batch_args:
        return "it takes no batches"
    data = batch_args[0]
    loops = [n for n in ast.walk(func) if isinstance(n, (ast.For, ast.AsyncFor, ast.While))]
    over = []
    for n in loops:
        it = getattr(n, "iter", None)
        if isinstance(it, ast.Name) and it.id == data:
            over.append((n, None))
        elif (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "enumerate" and it.args
              and isinstance(it.args[0], ast.Name) and it.args[0].id == data and isinstance(n.target, ast.Tuple)
              and n.target.elts and isinstance(n.target.elts[0], ast.Name)):
            over.append((n, n.target.elts[0].id))
    if len(over) != 1 or len(loops) != 1:
        return "it is not one plain for-loop over its batches"
    loop, index = over[0]
    uses = sum(1 for n in ast.walk(func) if isinstance(n, ast.Name) and n.id == data)
    if uses != 1:
        return "it uses its batches outside its for-loop"
    inside = {id(n) for stmt in loop.body for n in ast.walk(stmt)}
    outer = {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and id(n) not in inside} | set(args)
    for stmt in loop.body:
        for n in ast.walk(stmt):
            if isinstance(n, (ast.Break, ast.Continue, ast.Return, ast.Yield, ast.YieldFrom)):
                return "its loop can stop or skip early"
            if index is not None and isinstance(n, ast.Name) and n.id == index:
                return "its loop uses the batch index"
            if _carries(n, outer):
                return "its loop carries a value from batch to batch"
    return ""


_MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "pop", "clear", "remove"})


def _carries(n, outer: set) -> bool:
    """A statement that makes one batch's step depend on the host side of the last: `n += 1`,
    `total = total + loss`, `losses.append(loss)` or `seen[k] = v` on a local from outside the loop."""
    import ast

    if isinstance(n, ast.AugAssign):
        return True
    if isinstance(n, ast.Assign):
        names = {t.id for t in n.targets if isinstance(t, ast.Name)}
        if names & {v.id for v in ast.walk(n.value) if isinstance(v, ast.Name)}:
            return True
        return any(isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in outer
                   and t.value.id != "self" for t in n.targets)
    return (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _MUTATORS
            and isinstance(n.func.value, ast.Name) and n.func.value.id in outer and n.func.value.id != "self")


def host_state(model) -> tuple:
    """What a CUDA graph would freeze on the host side of a training step."""
    import random

    import numpy as np
    import torch

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    attrs = tuple((i, k, _token(v)) for i, m in enumerate(model.modules()) for k, v in vars(m).items()
                  if not k.startswith("_") and k != "training")
    return (random.getstate(), keys.tobytes(), pos, has_gauss, repr(gauss), torch.get_rng_state().numpy().tobytes(),
            attrs)


class GraphedBatches:
    """The epoch's batches, as the training loop sees them; see the module's docstring."""

    def __init__(self, batches, model):
        self.batches = batches
        self.model = model
        self.capturing = False
        self.loop_returned = False  # the loop returned (maybe before the last batch) rather than raised
        self.pending: list = []  # the batch being captured, handed back to an eager retry
        self.it = None
        self.gen = None
        self.eager = 0
        self.replayed = 0
        self.why_eager = ""

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.close()
        self.gen = self._steps()
        return self.gen

    def close(self) -> None:
        """Ends a capture or side-stream context left open by a loop that raised."""
        if self.gen is not None:
            self.gen.close()
            self.gen = None

    def _steps(self):
        import torch

        self.it = iter(self.batches)
        full = len(self.batches.y) // self.batches.batch_size
        if full < WARMUP_STEPS + 1 + MIN_REPLAYS:
            self.why_eager = f"{full} full batches are too few to capture"
            yield from self._eager(self.it)
            return
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        states = []
        for x, y in self.it:
            if len(states) >= WARMUP_STEPS:
                self.pending = [(x, y)]
                break
            side.wait_stream(main)
            try:
                with torch.cuda.stream(side):
                    self.eager += 1
                    yield x, y
            finally:  # also when the loop stops here: later work on the main stream follows this step
                main.wait_stream(side)
            states.append(host_state(self.model))
            if len(states) >= 2 and states[-1] != states[-2]:
                self.why_eager = "the training step changes host state (a counter, host randomness or a schedule)"
                yield from self._eager(self.it)
                return
        else:
            return
        x, y = self.pending[0]
        if x.shape[0] != self.batches.batch_size:
            self.why_eager = "no full batch left to capture"
            yield from self._eager(self._pending(), self.it)
            return
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        stream.wait_stream(main)
        stopped = False
        with torch.cuda.stream(stream):
            graph.capture_begin()
            self.capturing = True
            try:
                yield static_x, static_y
            except GeneratorExit:
                if not self.loop_returned:  # the loop raised inside the capture: drop it
                    self.capturing = False
                    try:
                        graph.capture_end()
                    except Exception:  # noqa: BLE001 - the capture was invalid; the loop already has its error
                        pass
                    raise
                stopped = True  # the loop stopped after this batch: its step stands
            graph.capture_end()  # raises when the capture was invalidated: the caller retries eagerly
            self.capturing = False
        main.wait_stream(stream)
        self.pending = []
        graph.replay()
        self.replayed += 1
        if stopped:
            return
        for x, y in self.it:
            if x.shape == static_x.shape and y.shape == static_y.shape:
                static_x.copy_(x)
                static_y.copy_(y)
                graph.replay()
                self.replayed += 1
            else:
                self.eager += 1
                yield x, y

    def _pending(self):
        while self.pending:
            yield self.pending.pop(0)

    def _eager(self, *its):
        for it in its:
            for x, y in it:
                self.eager += 1
                yield x, y

    def remaining(self) -> "_Remaining":
        """After a failed capture: the batch that was being captured, then the rest, eagerly."""
        return _Remaining(self)

    def describe(self) -> str:
        if self.replayed:
            return f"CUDA graph, {self.replayed} steps replayed and {self.eager} eager"
        return f"eager, {self.eager} steps ({self.why_eager})" if self.why_eager else f"eager, {self.eager} steps"


class _Remaining:
    def __init__(self, owner: GraphedBatches):
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner.batches)

    def __iter__(self):
        return self.owner._eager(self.owner._pending(), self.owner.it)


def run_epoch(learn, batches, model, log):
    """One epoch of `learn(batches)`, its steps replayed as a CUDA graph where that is safe;
    returns what `learn` returns."""
    import torch

    # The warm-up steps run on a side stream, so the first steps' gradients accumulate across
    # streams; torch warns about the extra synchronisation, which is all it costs here.
    quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if quiet is not None:
        quiet(False)
    why = loop_shape(learn)
    if why:
        log(f"training steps: eager ({why})")
        return learn(batches)
    graphed = GraphedBatches(batches, model)
    try:
        try:
            ret = learn(graphed)
            graphed.loop_returned = True
        except Exception as exc:
            if not graphed.capturing:
                raise
            # The loop raised inside the capture: end it, then redo that batch and the rest eagerly.
            text = str(exc).strip().splitlines()
            graphed.why_eager = f"capture failed: {type(exc).__name__}: {text[0][:200] if text else ''}"
            graphed.close()
            torch.cuda.synchronize()
            ret = learn(graphed.remaining())
    finally:
        graphed.close()
    log(f"training steps: {graphed.describe()}")
    return ret
