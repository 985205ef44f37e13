"""`attndsl.Attention`: a compiled spec as a torch.nn.Module.

A module keeps one plan per range of sequence lengths (the cost model's choice at each length of
passes/plan.LADDER, e.g. the exact pairwise form at short N and the Toeplitz-FFT form at long N)
and the kernels of each; forward runs, per call, the plan cheapest at its N, node by node on TVM
kernels (`attndsl.ops`). `reference` runs the spec's O(N²) meaning.
q, k (B, H, N, Dk), v (B, H, N, Dv), key_padding_mask (B, N) bool (True = padding) -> (B, H, N, Dv).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import config, decoding, driver, nonfinite, ops, padding, pipeline, precision, sampling
from .ast import AttentionSpec, learned_table, t5_slots
from .diagnostics import SpecError
from .featuremaps import lookup
from .ir import (Add, FeatureMap, Input, LinearAttention, Node, Position, PositionalAttention,
                 SampledAttention, SoftmaxAttention, ToeplitzValues, format_attr, format_ir,
                 postorder)
from .lowering.form import NARROW_DTYPES
from .lowering.forms import feature_map
from .lowering.registry import FORMS, form_of
from .lowering.target import MLIR as MLIR_TARGET
from .lowering.target import Target, resolve
from .passes.geometric import learned_decay
from .passes.plan import LADDER, PLAN_LENGTH
from .reference import alibi_slopes, bias_at, effective_scale, reference
from .runtime import omp
from .schedules import cpu as cpu_schedule

KERNEL_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
ROWS_PER_TILE = 64          # the O(N²) kernels' query tile: 4 vectors of float32 lanes with AVX-512


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, *, heads: int, head_dim: int, value_dim: int | None = None,
                 target: str | dict | Target = "llvm", plan: str = "auto", check_finite: bool = False,
                 tuned: bool = True, dtype: torch.dtype | str | None = torch.float32):
        super().__init__()

        for name, val in (("heads", heads), ("head_dim", head_dim), ("value_dim", value_dim or head_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.spec, self.heads, self.head_dim = spec, heads, head_dim
        self.value_dim = value_dim or head_dim
        self.scale = effective_scale(spec, head_dim)
        # where the kernels run (lowering/target.py); the TVM target is resolved (TVM imported) only
        # when building
        self.target = resolve(target)
        # the most query rows a call runs on the narrow kernels (Form.narrow): one vector of lanes
        # where the CPU kernels run and have them, none elsewhere
        self._narrow = {t: cpu_schedule.lanes(name) if self.target.kernels == "cpu" and name in NARROW_DTYPES else 0
                        for t, name in KERNEL_DTYPES.items()}
        self.check_finite = check_finite
        self.tuned = tuned                       # False: the default knobs, whatever the databases say
        # the distinct plans over the lengths of LADDER (one on mlir-cpu, whose program is one
        # graph): each call runs the one the cost model rates cheapest at its N (_plan_index)
        ladder = (PLAN_LENGTH,) if self.target.kind == "mlir" else LADDER
        planned = pipeline.run_lengths(spec, head_dim, self.value_dim, ladder, plan_name=plan, forms=self._forms())
        self.plans: tuple[pipeline.Planned, ...] = tuple({id(p): p for p in planned}.values())
        if plan == "auto" and any(self._learned_decay(p) for p in self.plans):
            # learned rates may turn negative (weights growing with distance), where the decayed
            # form does not run: keep a plan without it (_rates_decay)
            other = pipeline.run_lengths(spec, head_dim, self.value_dim, (PLAN_LENGTH,),
                                         forms=(self._forms() or frozenset(FORMS)) - {"decayed"})[0]
            if all(p.forms != other.forms for p in self.plans):
                self.plans += (other,)
        self._decays = tuple(self._learned_decay(p) for p in self.plans)
        self._warned_growing = False
        self._rates_checked = None               # the params' (data_ptr, version)s whose rates are ≥ 0
        self.planned = planned[ladder.index(PLAN_LENGTH)]    # the plan at N = 4096 (explain's default)
        self._planned_index = next(i for i, p in enumerate(self.plans) if p is self.planned)
        self._chosen: dict = {}                  # (N, dtype) -> index into plans; cross: _cross_plan
        self._programs: dict[int, tuple] = {}    # plan index -> its steps (program())
        self._kappa: dict = {}                   # (N, causal) -> κ of a fixed position term (precision.py)
        self._warned_float64: set[int] = set()   # lengths told they compute in float64
        self._warned_exact: set[int] = set()     # lengths told they run the exact pairwise plan
        self._libs: dict[tuple, str] = {}        # (plan index, kernel dtype) -> library key in ops
        self._build_log: list[str] = []
        self._tuning: dict[tuple, tuple] = {}    # (plan index, kernel dtype) -> (databases read, {kernel: choice})

        projection = None
        if spec.kernel.name != "softmax":
            projection = lookup(spec.kernel).projection(spec.kernel, head_dim)
        self.register_buffer("projection", None if projection is None else projection.float())
        # a learned table: (H, 2W + 1), or t5's (H, buckets) with each r's bucket in t5_slots (2W + 1,)
        self.position_table = None
        slots = None
        if learned_table(spec.position):
            w = int(spec.position["max_distance"])
            init = torch.zeros if spec.position["init"] == "zeros" else (lambda *s: 0.02 * torch.randn(*s))
            width = 2 * w + 1
            if spec.position.name == "t5":
                width = int(spec.position["buckets"])
                slots = torch.tensor(t5_slots(width, w, bidirectional=not spec.causal))
            self.position_table = nn.Parameter(init(heads, width))
        self.register_buffer("position_slots", slots, persistent=False)
        slopes = None
        if spec.position.name == "alibi":
            slope = spec.position["slope"]
            slopes = alibi_slopes(heads) if slope is None else torch.full((heads,), float(slope))
            slopes = slopes.float()[:, None]
        self.register_buffer("position_slopes", slopes)      # (H, 1), alibi only
        # `param NAME = INIT` (a scalar) and `param NAME[heads] = INIT` (H,): position(r) = EXPR's
        self.spec_params = nn.ParameterDict({p.name: nn.Parameter(torch.full((heads,) if p.per_head else (), p.init))
                                             for p in spec.params})
        planes = None
        if spec.sampling.name == "kde":
            planes = sampling.hyperplanes(spec.sampling["buckets"], head_dim, spec.sampling["seed"])
        self.register_buffer("lsh_planes", planes)           # (Dk, log2 buckets), kde only
        # the samples of every call are drawn from this seed: same inputs, same output; set it to
        # draw others (e.g. per training step)
        self.sampling_seed = spec.sampling["seed"] if spec.sampling.name != "none" else None
        self._fft_limits = [self._fft_lengths(i) for i in range(len(self.plans))]
        self._spans = self._crossovers()       # [(from N, to N, plan index)], float32 calls
        self._check_fft_range()
        self._mlir = None
        self._decoder: Node | None = None        # the planned IR step() runs (decoding.decode_root)
        self._valid: set = set()                 # input signatures _validate has passed
        self._constants: dict = {}               # (what, dtype, device, source version) -> tensors per call
        self._scratch: dict = {}                 # buffers a call without autograd reuses (padding.py)
        eager = _kernel_dtype(dtype)
        self._map_names = spec.map_params        # the params kernel(x) = EXPR reads (its walk, once)
        if self._map_names and self.target.portable:
            raise SpecError(f"kernel(x) = EXPR reads params ({', '.join(spec.map_params)}), whose kernels are "
                            f"CPU kernels only: target '{self.target}' builds the portable ones",
                            spec.span_of("kernel"), help="use target='llvm'; a GPU target takes params in "
                                                           "position(r) = EXPR only")
        if self.target.kind == "mlir":
            self._mlir = self._mlir_program()
        elif eager is not None:            # build now: fails early, and the first call is fast
            self.build(eager)

    # --- compilation ---------------------------------------------------------------------------

    def _forms(self) -> frozenset | None:
        """The forms the target has kernels for, which the planner picks from (None: all)."""
        if self.target.kind == "mlir":
            return None
        from . import lowering
        return lowering.forms_for(self.target)

    def build(self, dtype="float32") -> "Attention":
        """Build (or load from the cache) now the kernels of every plan this module may call in
        `dtype` (a torch dtype or its name), instead of at the first call of that dtype."""
        name = _kernel_dtype(dtype)
        if self.target.kind != "mlir" and name is not None:
            for i in dict.fromkeys(i for *_, i in self._spans):
                self._library(name, i)
        return self

    def _library(self, dtype: str, i: int | None = None) -> str:
        """The key (in ops) of the kernels of plan i (default: `planned`'s) in `dtype`, built or
        loaded once (driver.py)."""
        i = self._planned_index if i is None else i
        if (i, dtype) not in self._libs and torch.compiler.is_compiling():
            raise RuntimeError(f"attndsl: {self.spec.name}'s {dtype} kernels ({self._label(i)}) are not built, and "
                               f"torch.compile cannot build them while it traces: compile with dtype=torch.{dtype} "
                               f"(attndsl.compile builds float32 by default) or call the module once first")
        if (i, dtype) not in self._libs:
            lib = driver.library(self.spec, self.plans[i].root, self.target, (self.head_dim, self.value_dim),
                                 dtype, self.tuned)
            self._build_log.append(f"{lib.describe(dtype)}  [{self._label(i)}]")
            self._tuning[i, dtype] = (list(lib.dirs), lib.tuned)
            self._libs[i, dtype] = lib.key
        return self._libs[i, dtype]

    # --- decoding (decoding.py) ----------------------------------------------------------------------

    def initial_state(self, batch: int, dtype: torch.dtype = torch.float32, device="cpu"):
        """The decoding state before the first token of `batch` sequences (a causal spec whose form
        carries a running state: linear attention, decayed position terms)."""
        return decoding.initial_state(self, batch, dtype, device)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state):
        """(out (B, H, 1, Dv), next state): one more token, q, k (B, H, 1, Dk), v (B, H, 1, Dv), in
        O(1); equal to the full causal forward's row at that position."""
        return decoding.step(self, q, k, v, state)

    def _decode_root(self) -> Node:
        if self._decoder is None:
            self._decoder = decoding.decode_root(self)
        return self._decoder

    def _decode_library(self, dtype: str) -> str:
        """The key (in ops) of the decoding step's kernel in `dtype`, built or loaded once."""
        if ("decode", dtype) not in self._libs:
            lib = driver.library(self.spec, self._decode_root(), self.target, (self.head_dim, self.value_dim),
                                 dtype, decode=True)
            self._build_log.append(f"{lib.describe(dtype)}  [decoding step]")
            self._libs["decode", dtype] = lib.key
        return self._libs["decode", dtype]

    def _label(self, i: int) -> str:
        return ", ".join(self.plans[i].forms)

    def _plan_index(self, n: int, dtype: torch.dtype = torch.float32) -> int:
        """The plan a call of length n in `dtype` runs (_cheapest), memoized per (n, dtype). Under
        torch.compile, from the precomputed crossovers: comparisons dynamo turns into guards on N."""
        if len(self._spans) == 1:
            return self._spans[0][2]
        if torch.compiler.is_compiling():
            return next((i for _, last, i in self._spans if n <= last), self._spans[-1][2])
        key = (n, dtype)
        if key not in self._chosen:
            self._chosen[key] = self._cheapest(n, dtype)
        return self._chosen[key]

    def _cheapest(self, n: int, dtype: torch.dtype = torch.float32) -> int:
        """The cheapest plan at n by the cost model among those that can compute a call in
        `dtype`: a Toeplitz-FFT plan only up to the length it resolves a fixed position term to
        that dtype's tolerance (precision.py)."""
        usable = [i for i, limits in enumerate(self._fft_limits) if limits is None or n <= limits[dtype]]
        return min(usable or range(len(self.plans)), key=lambda i: self.plans[i].cost(n))

    # --- pickling: the libraries are per process, reattached (cache or build) at the first call ---

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mlir"] = None                    # a compiled program: rebuilt on first use
        state["_constants"], state["_valid"], state["_scratch"] = {}, set(), {}   # per-process, remade on use
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # library keys name what ops holds in *this* process: keep those (a deepcopy), drop others
        for which, key in list(self._libs.items()):
            if key not in ops._LIBRARIES:
                del self._libs[which]
                self._tuning.pop(which, None)

    def _mlir_program(self):
        from .mlir import backend, linalg
        if self.spec.learned_position or self.spec.map_params:
            raise SpecError(f"target '{MLIR_TARGET}' takes no param: its program reads a fixed position term "
                            f"and kernel map", self.spec.params[0].span,
                            help="use target='llvm' (TVM), which learns params")
        try:
            return backend.Program(self.planned.root, self.spec.name,
                                   backend.params(self.spec, self.heads, self.head_dim))
        except linalg.NotLowered as e:
            raise SpecError(f"{e} on target '{MLIR_TARGET}', so spec '{self.spec.name}' cannot be "
                            f"compiled for it", self.spec.span,
                            help="use target='llvm' (TVM), which compiles every form") from None

    # --- forward -----------------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """out (B, H, Nq, Dv) for q (B, H, Nq, Dk), k (B, Hkv, Nk, Dk), v (B, Hkv, Nk, Dv): Nk ≠ Nq
        is cross-attention and Hkv < H (dividing H) grouped-query attention (docs/language.md#cross-
        attention-and-grouped-heads); key_padding_mask (B, Nk) bool, True = a key left out of every
        row's sums (nn.MultiheadAttention's convention; docs/language.md#key-padding-masks)."""
        self._validate(q, k, v)
        # on a busy core torch's ops run on this thread alone, as the kernels' loops then do
        restore = 0 if torch.compiler.is_compiling() else omp.torch_alone()
        try:
            if k.shape[1:3] != q.shape[1:3]:
                return self._cross(q, k, v, key_padding_mask)
            return self._attend(q, k, v, key_padding_mask)
        finally:
            if restore:
                torch.set_num_threads(restore)

    def _attend(self, q, k, v, key_padding_mask) -> torch.Tensor:
        """forward() of validated q (B, H, N, Dk), k (B, Hkv, Nk, Dk), v (B, Hkv, Nk, Dv): Nk = N, or
        Nk ≠ N where the plan's kernels take both lengths (_cross_plan); Hkv < H (grouped heads)
        read as they are where the plan's kernels do (_reads_grouped), else expanded to H."""
        out_dtype = q.dtype
        dtype = UPCAST.get(q.dtype, q.dtype)
        B, H, N, _ = q.shape
        nk = k.shape[2]
        if key_padding_mask is None and nk != N and self.spec.window is not None:
            # a sliding window leaves the rows farther than W from every key with none: an empty
            # mask finds them (padding.py), and they are 0, as a padded row with no key is
            key_padding_mask = torch.zeros(B, nk, dtype=torch.bool, device=q.device)
        pad = None
        if key_padding_mask is not None:
            pad = self._padding(key_padding_mask, q, nk)
        if B == 0:
            return self._empty(q, k, v)
        i, run_dtype = None, dtype
        if self.target.kind != "mlir":
            if nk != N:                          # cross-attention: a plan whose kernels take both
                i = self._cross_plan(N, nk, dtype)
            else:
                i = self._rates_decay(self._plan_index(N, dtype), N)
                # precision.py: float64 resolves what float32 cannot
                run_dtype, i = self._fft_dtype(dtype, N, i, pad)
        g = H // k.shape[1]                      # grouped heads: query heads per kv head
        if g > 1 and (i is None or not self._reads_grouped(i)):
            k, v = (t.repeat_interleave(g, 1) for t in (k, v))
            g = 1
        env = {"q": q.to(run_dtype).reshape(B * H, N, -1).contiguous(),
               "k": k.to(run_dtype).reshape(B * H // g, nk, -1).contiguous(),
               "v": v.to(run_dtype).reshape(B * H // g, nk, -1).contiguous()}
        if pad is not None and (self.spec.kernel.name == "softmax" or self.spec.stabilized):
            env["k"] = pad.drop(env["k"], tag="k")   # 0: no score or stabilizer sees what they held
        if self.target.kind == "mlir":
            if self._mlir is None:
                self._mlir = self._mlir_program()
            return self._forward_mlir(env, dtype, q, k, v).reshape(B, H, N, self.value_dim).to(out_dtype)
        dtype = run_dtype
        out, den = self._run(env, dtype, i, pad)
        # a normalizer near underflow (precision.py): float64, else refused
        low = None if den is None else den < precision.UNDERFLOW[dtype]
        if low is not None and bool(low.any()) and dtype != torch.float64:
            if N not in self._warned_float64:
                self._warned_float64.add(N)
                least = float(den.min())
                why = (f"the {self.spec.kernel.name} stabilizer left a row's normalizer at {least:.3g}" if
                       self.spec.stabilized else f"a row far from every key the key padding mask keeps has "
                       f"a normalizer of {least:.3g}")
                warnings.warn(f"attndsl: {self.spec.name} at N={N} computes in float64: {why}, near "
                              f"{str(dtype).removeprefix('torch.')}'s underflow; the output keeps its dtype",
                              stacklevel=2)
            batch = low.view(B, H).any(1)
            if pad is not None and not self.spec.stabilized and not bool(batch.all()):
                out, den = self._split(env, dtype, i, pad, batch, out), None
            else:
                dtype = torch.float64
                out, den = self._run({name: t.double() for name, t in env.items()}, dtype, i, pad)
        if den is not None and bool((den < precision.UNDERFLOW[dtype]).any()):
            if self.spec.stabilized:
                raise precision.stabilizer_refusal(self.spec.name, N)
            raise precision.padding_refusal(self.spec.name, N)
        return out.reshape(B, H, N, self.value_dim).to(out_dtype)

    def _split(self, env: dict, dtype: torch.dtype, i: int, pad: padding.Padding, batch: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        """The call with the batch elements `batch` (B,) bool, whose rows' normalizers underflow in
        `dtype` under a key padding mask, rerun in float64 (else refused), and the others in `dtype`
        (without autograd: `out`'s rows, the first run's): out (BH, N, Dv) in `dtype`. k and v
        may have a row per kv head of grouped heads (_reads_grouped)."""
        B, heads = batch.shape[0], self.heads
        rows = batch.repeat_interleave(heads)                          # (BH,)
        kv_rows = batch.repeat_interleave(env["k"].shape[0] // B)      # (B·Hkv,)
        mask = pad.keys.view(B, heads, -1)[:, 0]
        parts = []
        for which, which_kv, d in ((~rows, ~kv_rows, dtype), (rows, kv_rows, torch.float64)):
            if d == dtype and not torch.is_grad_enabled():
                parts.append(out[which])
                continue
            sub = padding.Padding.of(mask[which.view(B, heads)[:, 0]], heads, self.spec.causal, pad.scratch,
                                     self.spec.window, env["q"].shape[1])
            part, den = self._run({name: t[which if name == "q" else which_kv].to(d) for name, t in env.items()},
                                  d, i, sub)
            if d == torch.float64 and den is not None and bool((den < precision.UNDERFLOW[d]).any()):
                raise precision.padding_refusal(self.spec.name, mask.shape[1])
            parts.append(part.to(dtype))
        order = torch.cat([(~rows).nonzero(), rows.nonzero()]).flatten()
        return torch.cat(parts)[torch.argsort(order)]

    def _run(self, env: dict, dtype: torch.dtype, i: int,
             pad: padding.Padding | None = None) -> tuple[torch.Tensor, float | None]:
        """Plan i on the kernels of `dtype` with the NaN rule of docs/numerics.md and the key
        padding mask `pad`: (out (BH, N, Dv), each row's (BH,) smallest normalizer of a stabilized
        map's form or, with a key padding mask, of a position term's form; None otherwise and under
        torch.compile)."""
        lib = self._library(KERNEL_DTYPES[dtype], i)
        device = env["q"].device
        n = max(env["q"].shape[1], env["k"].shape[1])      # b(r) over r = −(Nk − 1) … N − 1
        env = {**env, "position": self._position_params(dtype, n).to(device)}
        w, wt = self._projection(dtype, device)
        dens: list = []                          # each normalizer's minimum, as the runners see it
        # a stabilized map's, or with a key padding mask a position term's: a row far from every
        # kept key of a decaying b has a normalizer that can underflow
        watch = ((self.spec.stabilized or (pad is not None and self.spec.position.name != "none"))
                 and not torch.compiler.is_compiling())
        params = {"w": w, "wt": wt, "lsh_planes": self.lsh_planes, "seed": self.sampling_seed,
                  "dens": dens if watch else None, "pad": pad, "narrow": self._narrow[dtype],
                  "map": self._map_values(dtype, device)}
        steps = self._program(i)
        out = nonfinite.guarded(lambda q, k, v: _execute(steps, {**env, "q": q, "k": k, "v": v}, lib, params),
                                env["q"], env["k"], env["v"], self.spec.causal,
                                reads_every_key=self.spec.sampling.name == "none", pad=pad,
                                window=self.spec.window)
        if not dens:
            return out, None
        return out, dens[-1].detach().nan_to_num(0.0)     # the last run's (the exact path's, if taken)

    def _cross(self, q, k, v, key_padding_mask) -> torch.Tensor:
        """Grouped heads and cross-attention. Query head h reads key and value head h // (H / Hkv),
        as SDPA's enable_gqa: the g = H / Hkv query heads of a kv head run as g·Nq rows of one call
        where rows do not know their position (_groups_as_rows); else the O(N²) forms' kernels read
        each kv head for its g query heads (_reads_grouped), and any other plan's get k and v
        expanded to H heads (one copy). With Nk ≠ Nq, every index keeps its position (r = i − j);
        a plan whose kernels take both lengths (the O(N²) forms') runs as it is, at a cost of
        Nq·Nk; any other in a sequence of N = max(Nq, Nk): the keys past Nk are padding (a key
        padding mask), the query rows past Nq are computed and dropped, so the call costs what a
        self-attention call of N does."""
        B, H, nq = q.shape[:3]
        hkv, nk = k.shape[1], k.shape[2]
        if hkv != H and self._groups_as_rows(H // hkv, nq, nk, q.dtype, B * hkv,
                                             torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
            # query heads h·g … h·g + g − 1 of kv head h as the rows of one call: no copy of anything
            return self._attend(q.reshape(B, hkv, H // hkv * nq, -1), k, v, key_padding_mask).reshape(B, H, nq, -1)
        if nk == nq or self._cross_plan(nq, nk, UPCAST.get(q.dtype, q.dtype)) is not None:
            return self._attend(q, k, v, key_padding_mask)
        if self.target.kind == "mlir":
            raise ValueError(f"cross-attention (query length {nq}, key length {nk}): target '{MLIR_TARGET}' "
                             f"computes self-attention only; compile with target='llvm' (TVM)")
        n = max(nq, nk)
        mask = torch.zeros(B, nk, dtype=torch.bool, device=q.device) if key_padding_mask is None else \
            padding.check_mask(key_padding_mask, B, nk, q.device)
        mask = torch.nn.functional.pad(mask, (0, n - nk), value=True)
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[2])) for t in (q, k, v))
        return self(q, k, v, key_padding_mask=mask if nk < n or key_padding_mask is not None else None)[:, :, :nq]

    def _cross_plan(self, nq: int, nk: int, dtype: torch.dtype) -> int | None:
        """The plan a call of nq queries and nk keys runs as it is, or None when the padded route
        (_cross: a self-attention of max(nq, nk)) costs less or no plan takes both lengths. A plan
        takes them when it runs on TVM's CPU kernels and every site's form reads both (Form.cross;
        feature maps are row-wise): an O(N²) form, which costs nq·nk, i.e. its cost at √(nq·nk);
        the padded route costs the cheapest plan's at max(nq, nk). Memoized per (nq, nk, dtype)."""
        key = ("cross", nq, nk, dtype)
        if key in self._chosen:
            return self._chosen[key]
        padded = self._plan_index(max(nq, nk), dtype)
        native = [i for i in range(len(self.plans)) if self._takes_two_lengths(i)]
        n = max(1, round((nq * nk) ** 0.5))
        best = None
        for i in native:                         # (a loop, not min(key=): torch.compile traces it)
            if best is None or self.plans[i].cost(n) < self.plans[best].cost(n):
                best = i
        if best is not None and best != padded and self.plans[best].cost(n) > self.plans[padded].cost(max(nq, nk)):
            best = None
        if not torch.compiler.is_compiling():
            self._chosen[key] = best
        return best

    def _groups_as_rows(self, g: int, nq: int, nk: int, dtype: torch.dtype, calls: int, grads: bool) -> bool:
        """Whether grouped heads run as rows: the g query heads of a kv head stacked into one call
        of g·Nq queries against its Nk keys (`calls` = B·Hkv of them), which needs a spec whose rows
        do not know their position or head (no position term, causal mask, window or kernel map
        reading params) and is exact (not sampled), and a plan that takes those lengths as they are
        (_cross_plan) or equal lengths.
        With gradients, also where it takes no longer than k and v expanded to H heads: the O(N²)
        backward runs a batch·head per thread, and its work is a key pass per tile of queries."""
        spec = self.spec
        if (spec.position.name != "none" or spec.causal or spec.window is not None or spec.sampling.name != "none"
                or self._map_names or self.target.kind == "mlir"):
            return False
        if grads:
            threads, tiles = config.num_threads(), -(-nq // ROWS_PER_TILE)
            as_rows = calls * -(-g * nq // ROWS_PER_TILE) / min(calls, threads)
            if as_rows > calls * g * tiles / min(calls * g, threads):
                return False
        return g * nq == nk or self._cross_plan(g * nq, nk, UPCAST.get(dtype, dtype)) is not None

    def _reads_grouped(self, i: int) -> bool:
        """Whether plan i's kernels read k and v of fewer heads than q (Form.grouped: TVM's CPU
        kernels of the O(N²) forms, after feature maps that are the same for every head), so that
        grouped heads run without expanding k and v."""
        if self.target.kind == "mlir" or self.target.portable or self._map_names:
            return False
        return all(st.source is not None or isinstance(st.node, FeatureMap)
                   or getattr(form_of(st.node), "grouped", False) for st in self._program(i))

    def _takes_two_lengths(self, i: int) -> bool:
        """Whether plan i's kernels read keys of another length than the queries (_cross_plan)."""
        if self.target.kind == "mlir" or self.target.portable:
            return False
        return all(st.source is not None or isinstance(st.node, FeatureMap) or getattr(form_of(st.node), "cross", False)
                   for st in self._program(i))

    def _empty(self, q, k, v) -> torch.Tensor:
        """The (0, H, N, Dv) output of an empty batch, as SDPA gives, still connected to q, k, v
        and the position table so that backward gives them (empty or zero) gradients."""
        zero = (q.sum() + k.sum() + v.sum()).to(v.dtype) * 0
        for t in (self.position_table, *self.spec_params.values()):
            if t is not None:
                zero = zero + (t.sum() * 0).to(v.dtype)
        return v.new_zeros(*q.shape[:3], v.shape[-1]) + zero

    def _program(self, i: int) -> tuple:
        """Plan i's steps (program()), made once."""
        if i not in self._programs:
            self._programs[i] = program(self.plans[i].root)
        return self._programs[i]

    @staticmethod
    def _learned_decay(planned: pipeline.Planned) -> bool:
        """Whether the plan runs a decayed site whose rates come from params (geometric.py)."""
        return any(isinstance(n, PositionalAttention) and n.form == "decayed"
                   and learned_decay(n.bias.position, n.causal) for n in postorder(planned.root))

    def _rates_decay(self, i: int, n: int) -> int:
        """Plan i, unless its decayed site reads learned rates that are negative now (b(r) growing
        with distance, which its running state cannot carry): then the cheapest plan at n without
        it (warned once), or, with plan='decayed', a ValueError. Not checked under torch.compile."""
        if not self._decays[i] or torch.compiler.is_compiling():
            return i
        version = tuple((p.data_ptr(), p._version) for p in self.spec_params.values())
        if self._rates_checked != version:       # once per update of the params
            with torch.no_grad():
                b = self._tabulated(2, torch.float64)        # b(r) at r = −1, 0, 1
            rate = b[:, 1] - b[:, 2]
            self._rates_checked = version if not bool((rate < 0).any()) else None
        if self._rates_checked is not None:
            return i
        others = [j for j, decays in enumerate(self._decays) if not decays]
        what = (f"the params make b(r) grow with distance (rate b(0) − b(1) = {float(rate.min()):.3g} < 0 in "
                f"some head), and the decayed form's running state carries decaying weights only")
        if not others:
            raise ValueError(f"{self.spec.name}: {what}; compile with plan='auto' (an exact form takes "
                             f"such calls), or keep the rate positive, e.g. position(r) = -exp(s) * abs(r)")
        j = min(others, key=lambda j: self.plans[j].cost(n))
        if not self._warned_growing:
            self._warned_growing = True
            warnings.warn(f"attndsl: {self.spec.name}: {what}; such calls run {self._label(j)}", stacklevel=3)
        return j

    def _fft_site(self, i: int) -> PositionalAttention | None:
        """Plan i's Toeplitz-FFT scores site, if any (target mlir-cpu evaluates it densely)."""
        if self.target.kind == "mlir":
            return None
        return next((st.node for st in self._program(i) if isinstance(st.node, PositionalAttention)
                     and getattr(form_of(st.node), "fft_scores", False)), None)

    def _fft_lengths(self, i: int) -> dict[torch.dtype, int] | None:
        """Per input dtype, the longest N at which plan i's Toeplitz-FFT form resolves this
        module's fixed position term (precision.py); None without one (no FFT site, or a learned
        table)."""
        site = self._fft_site(i)
        if site is None or learned_table(site.bias.position):
            return None
        return {d: precision.longest(site.bias.position, site.causal, self.heads, self.position_slopes, d)
                for d in (torch.float32, torch.float64)}

    def _exact_index(self, n: int) -> int | None:
        """The cheapest plan at n without a Toeplitz-FFT site (None if every plan has one)."""
        exact = [i for i in range(len(self.plans)) if self._fft_site(i) is None]
        return min(exact, key=lambda i: self.plans[i].cost(n)) if exact else None

    def _check_fft_range(self) -> None:
        """A fixed position term the FFT form resolves only on short sequences, with no other plan
        to run instead (plan= forces the FFT form), is refused here."""
        if self._exact_index(PLAN_LENGTH) is not None:
            return
        lengths = self._fft_limits[0]
        if lengths is not None and max(lengths.values()) < precision.MIN_LENGTH:
            raise SpecError(f"the Toeplitz-FFT form cannot compute this position term past "
                            f"N={max(lengths.values())}: exp(b) spans so much that rows whose weights are "
                            f"small beside the largest ones lose their digits, even in float64",
                            self.spec.span_of("position"),
                            help="plan='auto' (or 'pairwise'), which computes it exactly pair by pair, or a "
                                 "bias that decays (or stays flat) with distance, e.g. position(r) = "
                                 "-0.1 * abs(r); see docs/numerics.md")

    def _fft_dtype(self, dtype: torch.dtype, n: int, i: int,
                   pad: padding.Padding | None = None) -> tuple[torch.dtype, int]:
        """The dtype and plan a call of length n runs in: its own while plan i's Toeplitz-FFT form
        resolves the position term there (with the call's key padding mask `pad`, over the rows'
        kept keys); where only float64 does, float64, or the cheapest exact plan (no FFT site) in
        its own dtype where the cost model puts that below precision.FLOAT64_COST times plan i's;
        the exact plan where neither dtype does (each warned once); else PrecisionError."""
        site = self._fft_site(i)
        if site is None or torch.compiler.is_compiling():    # the check runs in eager mode
            return dtype, i
        position, key = site.bias.position, (n, site.causal)
        learned = learned_table(position)
        kappa = None if learned or pad is not None else self._kappa.get(key)    # a table changes
        if kappa is None:
            table = self._tabulated(n, torch.float64) if position.name == "tabulated" else self._table()
            b = precision.position_values(position, n, self.heads, table, self.position_slopes)
            if pad is not None:
                kept = ~pad.keys.view(-1, self.heads, n)[:, 0].cpu()
                kappa = precision.padded_condition(b, site.causal, kept, pad.empty.cpu())
            else:
                kappa = precision.condition(b, site.causal)
            if not learned and pad is None:
                self._kappa[key] = kappa
        chosen = precision.dtype_for(kappa, dtype)
        what = ("this position term at its params' values" if position.name == "tabulated" else
                "the learned position table" if learned else "this position term")
        if pad is not None:
            what += " over the keys this key padding mask keeps"
        if chosen is None:
            exact = self._exact_index(n)
            if exact is None:
                raise precision.refusal(kappa, n, dtype, what)
            if n not in self._warned_exact:
                self._warned_exact.add(n)
                warnings.warn(f"attndsl: {self.spec.name} at N={n} runs the exact pairwise form, O(N²): the "
                              f"Toeplitz-FFT form cannot resolve {what} (condition κ = {kappa:.3g}, beyond "
                              f"float64's {precision.limit(torch.float64):.3g})", stacklevel=3)
            return dtype, exact
        exact = self._exact_index(n) if chosen != dtype else None
        if exact is not None and self.plans[exact].cost(n) < precision.FLOAT64_COST * self.plans[i].cost(n):
            if n not in self._warned_exact:
                self._warned_exact.add(n)
                forms = "+".join(self.plans[exact].forms)
                warnings.warn(f"attndsl: {self.spec.name} at N={n} runs the exact {forms} form in "
                              f"{str(dtype).removeprefix('torch.')}: the Toeplitz-FFT form would compute "
                              f"in float64 to resolve {what} (condition κ = {kappa:.3g} > "
                              f"{precision.limit(dtype):.3g}), which costs more", stacklevel=3)
            return dtype, exact
        if chosen != dtype and n not in self._warned_float64:
            self._warned_float64.add(n)
            warnings.warn(f"attndsl: {self.spec.name} at N={n} computes in float64 (the Toeplitz-FFT "
                          f"form cannot resolve {what} in {str(dtype).removeprefix('torch.')}: condition "
                          f"κ = {kappa:.3g} > {precision.limit(dtype):.3g}); the output keeps its dtype",
                          stacklevel=3)
        return chosen, i

    def _forward_mlir(self, env, dtype, q, k, v) -> torch.Tensor:
        table = self.position_table
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, table)):
            raise RuntimeError(f"target '{MLIR_TARGET}' runs the forward pass only, and these inputs (or "
                               f"the position table) require grad: call it under torch.no_grad(), or "
                               f"compile with target='llvm' for gradients")
        tab = self._position_params(dtype, q.shape[2])
        rates, samples = torch.zeros(self.heads, 2, dtype=dtype), []
        for node in postorder(self.planned.root):
            if isinstance(node, PositionalAttention) and node.form == "decayed":
                from .lowering.forms.decayed import rates as decay_rates
                rates = decay_rates(node, tab).contiguous()
            if isinstance(node, SampledAttention):       # sorted and sampled in torch, as for TVM
                s = sampling.draw(env["q"], env["k"], env["v"], node.sampling, self.lsh_planes,
                                  self.sampling_seed, node.scale)
                samples = [torch.argsort(s.pq, dim=-1).int(), torch.argsort(s.pk, dim=-1).int(), s.si, s.lw, s.sb,
                           s.vs]
        return self._mlir(KERNEL_DTYPES[dtype], env["q"], env["k"], env["v"], self._projection(dtype)[0],
                          tab.detach(), rates.detach(), *samples)

    def _projection(self, dtype, device="cpu"):
        """(W', W'ᵀ) of a projected map in `dtype` on `device` (zeros (Dk, Dk) for the others, which
        the kernels take but never read), made once per version of the projection buffer."""
        p = self.projection

        def make():
            w = (torch.zeros(self.head_dim, self.head_dim, dtype=dtype) if p is None
                 else p.to(dtype).contiguous()).to(device)
            return w, w.T.contiguous()
        if torch.compiler.is_compiling():       # a version number is not a graph's business
            return make()
        # kept with the buffer it was made from (so its memory is never reused by another) and
        # that buffer's version: remade when the buffer is replaced or written in place
        key, version = ("projection", dtype, str(device)), None if p is None else p._version
        entry = self._constants.get(key)
        if entry is None or entry[0] is not p or entry[1] != version:
            entry = (p, version, make())
            self._remember(key, entry)
        return entry[2]

    def _remember(self, key, value) -> None:
        if len(self._constants) > 64:            # old versions of the buffers
            self._constants.clear()
        self._constants[key] = value

    def _table(self) -> torch.Tensor | None:
        """The learned table as the kernels and the reference read it, (H, 2W + 1): t5's buckets
        gathered per distance (differentiable: the buckets get the slots' gradients summed)."""
        if self.position_table is None or self.position_slots is None:
            return self.position_table
        return self.position_table[:, self.position_slots]

    def _position_params(self, dtype, n: int) -> torch.Tensor:
        """What the position kernels read as TAB (H, P) at length n: the table, the alibi slopes,
        or a dummy; with a sliding window, its table (H, 2W + 3) (ast.windowed); for position(r) =
        EXPR with params, b(r) over r = −(n − 1) … n − 1 (ast.tabulated)."""
        if self.spec.window is not None:
            return self._window_table(dtype)
        if self.spec.learned_position:
            return self._tabulated(n, dtype)
        if self.position_table is not None:
            return self._table().to(dtype).contiguous()
        if self.position_slopes is not None:
            return self.position_slopes.to(dtype).contiguous()
        key = ("no position", dtype)
        if torch.compiler.is_compiling():
            return torch.zeros(self.heads, 1, dtype=dtype)
        if key not in self._constants:
            self._remember(key, torch.zeros(self.heads, 1, dtype=dtype))
        return self._constants[key]

    def _window_table(self, dtype) -> torch.Tensor:
        """b_h(r) at r = −(W + 1) … W + 1 (H, 2W + 3): the spec's position term (0 without one)
        inside the window, KEY_OUT at ±(W + 1), which the kernels read at every farther r.
        Differentiable in a learned table and the params; without autograd, one tensor per dtype
        and version of those."""
        w, learned = self.spec.window, [self.position_table, *self.spec_params.values()]
        learned = [t for t in learned if t is not None]
        if (any(t.requires_grad for t in learned) and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return self._windowed(w, dtype)
        key = ("window", dtype, *((t.data_ptr(), t._version) for t in learned))
        if key not in self._constants:
            self._remember(key, self._windowed(w, dtype))
        return self._constants[key]

    def _windowed(self, w: int, dtype) -> torch.Tensor:
        r = torch.arange(-(w + 1), w + 2)
        b = (torch.zeros(self.heads, r.numel(), dtype=dtype) if self.spec.position.name == "none" else
             bias_at(self.spec.position, r, self.heads, dtype, self._table(), self.position_slopes,
                     self._params(dtype)))
        edge = torch.zeros_like(b, dtype=torch.bool)
        edge[:, [0, -1]] = True
        return b.masked_fill(edge, padding.KEY_OUT).contiguous()

    def _tabulated(self, n: int, dtype) -> torch.Tensor:
        """b_h(r) of position(r) = EXPR with the params' current values at r = −(n − 1) … n − 1,
        (H, 2n − 1) (ast.tabulated): differentiable in the params."""
        r = torch.arange(-(n - 1), n)
        return bias_at(self.spec.position, r, self.heads, dtype, params=self._params(dtype)).contiguous()

    def _map_values(self, dtype, device) -> torch.Tensor | None:
        """The values of the params kernel(x) = EXPR reads, (H, P) in spec.map_params's order (a
        scalar param in every row; differentiable), as its kernels read them; None when it reads none."""
        if not self._map_names:
            return None
        return torch.stack([self.spec_params[n].to(dtype).expand(self.heads) for n in self._map_names], 1).to(device)

    def _params(self, dtype) -> dict[str, torch.Tensor]:
        """The params' values in `dtype` as EXPR reads them: a scalar, or (H, 1) per head."""
        return {name: p.to(dtype).reshape(-1, 1) if p.dim() else p.to(dtype) for name, p in self.spec_params.items()}

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The spec's meaning literally, O(N²), with this module's random features and tables."""
        self._validate(q, k, v)
        if key_padding_mask is not None:
            key_padding_mask = padding.check_mask(key_padding_mask, q.shape[0], k.shape[2], q.device)
        return reference(self.spec, q, k, v, projection=self.projection, position_table=self._table(),
                         params=self._params(torch.float64),
                         key_padding_mask=key_padding_mask)

    def _padding(self, mask, q, nk: int) -> padding.Padding:
        """The call's key_padding_mask (B, Nk), checked, per batch·head row, for q (B, H, N, Dk)
        (H: the heads of the call, Hkv when grouped heads run as rows)."""
        mask = padding.check_mask(mask, q.shape[0], nk, q.device)
        if self.target.kind == "mlir":
            raise ValueError(f"key_padding_mask: target '{MLIR_TARGET}' computes the spec's mask only; "
                             f"compile with target='llvm' (TVM) for key padding masks")
        scratch = None if torch.is_grad_enabled() else self._scratch
        return padding.Padding.of(mask, q.shape[1], self.spec.causal, scratch, self.spec.window, q.shape[2])

    def _validate(self, q, k, v) -> None:
        """The checks of q, k, v's types, shapes, dtypes and devices, once per signature (and, with
        check_finite, their values at every call)."""
        sig = None
        if not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in (q, k, v)):
            sig = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)
        if sig is None or sig not in self._valid:
            self._check_inputs(q, k, v)
            if sig is not None:
                if len(self._valid) > 256:
                    self._valid.clear()
                self._valid.add(sig)
        if self.check_finite:
            self._check_finite(q, k, v)

    def _check_inputs(self, q, k, v) -> None:
        kind = self.target.kind
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-d (batch, heads, seq, dim) like "
                                 f"scaled_dot_product_attention, got shape {tuple(t.shape)}")
            if t.dtype not in KERNEL_DTYPES and t.dtype not in UPCAST:
                raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float64, "
                                f"bfloat16 and float16 (computed in float32)")
            if t.device.type != "cpu" and kind == "llvm":
                raise ValueError(f"{name} is on {t.device}, but this Attention was compiled for the "
                                 f"CPU (target llvm); move it with .cpu() or compile for a GPU target")
            if t.device.type != "cuda" and kind == "cuda":
                raise ValueError(f"{name} is on {t.device}, but this Attention was compiled for CUDA "
                                 f"(target {self.target}); move it with .cuda() or compile for 'llvm'")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        B, H, N, D = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        want = {"q": (B, self.heads, N, self.head_dim), "k": (B, hkv, nk, self.head_dim),
                "v": (B, hkv, nk, self.value_dim)}
        for name, t in (("q", q), ("k", k), ("v", v)):
            # q has every head, k and v a divisor of them (grouped heads)
            heads_ok = t.shape[1] == self.heads if name == "q" else 0 < t.shape[1] and self.heads % t.shape[1] == 0
            if not heads_ok and t.shape[2] == self.heads:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: dimension 1 must be heads "
                                 f"({self.heads}), as in scaled_dot_product_attention's (batch, heads, "
                                 f"seq, dim); this looks like (batch, seq, heads, dim): pass "
                                 f"{name}.transpose(1, 2)")
        if hkv < 1 or self.heads % hkv:
            raise ValueError(f"k has {hkv} heads, which does not divide the {self.heads} heads of q: grouped-query "
                             f"attention needs heads % kv_heads == 0 (as SDPA's enable_gqa)")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want[name]} "
                                 f"(heads={self.heads}, head_dim={self.head_dim}, "
                                 f"value_dim={self.value_dim}; batch and query length taken from q, "
                                 f"kv heads and key length from k)")
        if N == 0 or nk == 0:
            raise ValueError("sequence length is 0: attention needs at least one query and one key")

    def _check_finite(self, q, k, v) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")
        named = [(n, getattr(self, n)) for n in ("position_table", "position_slopes", "projection")]
        for name, t in named + [(f"param {n}", p) for n, p in self.spec_params.items()]:
            if t is not None and not torch.isfinite(t.detach()).all():
                raise ValueError(f"the module's {name} contains NaN or Inf (check_finite=True); "
                                 f"it is used by every call: restore it (e.g. load_state_dict)")

    # --- explain -----------------------------------------------------------------------------------

    def explain(self, n: int | None = None) -> str:
        """The plan: chosen form and estimated cost per site, kernels, and the IR after each pass."""
        from .lowering.costs import quadratic_cost
        from .passes.plan import cost_of
        spec = self.spec
        lines = [f"attention {spec.name}  ({spec.span})",
                 f"  heads={self.heads} head_dim={self.head_dim} value_dim={self.value_dim} "
                 f"scale={self.scale:.6g} target={self.target}", ""]
        n = n or PLAN_LENGTH
        chosen = self._plan_index(n)
        planned = self.plans[chosen]
        lines.append(f"plan at N={n} (cost model: flops per batch·head; where `attndsl calibrate` has run on "
                     f"this CPU, each form's measured fixed cost and time per flop, in flops at the median rate):")
        for d in planned.decisions:
            costs = {f: cost_of(f, d.site, n) for f, _ in d.costs}
            quad = quadratic_cost(d.site, n)
            listed = "  ".join(f"{f}={c / 1e6:.1f}M" for f, c in costs.items())
            lines.append(f"  {d.site.op}: {d.form}   [{listed}; quadratic O(N²)={quad / 1e6:.1f}M, "
                         f"{quad / costs[d.form]:.0f}x more]")
        if len(self._spans) > 1:
            lines.append(f"  per call, by N (float32): {self._ranges()}")
        lengths = self._fft_limits[chosen]
        if lengths is not None:
            lines.append(f"  precision (docs/numerics.md): the Toeplitz-FFT form resolves this position term "
                         f"for float32 inputs up to N={lengths[torch.float32]}, float64 up to "
                         f"N={lengths[torch.float64]} (of {precision.LENGTHS[-1]} tried)")
        elif self._fft_site(chosen) is not None:
            lines.append("  precision (docs/numerics.md): the learned table is checked at every call")
        lines.append("")
        if self.target.kind == "mlir":
            from .mlir.linalg import describe
            lines.append(f"target {MLIR_TARGET} (torch-mlir: attn dialect -> linalg -> LLVM, forward only):")
            site = lambda i, node: f"  {node.op}{i}   {describe(node)}"                 # noqa: E731
        else:
            what = "TVM"
            if self.target.portable:
                what = "TVM, the portable kernels" + (", bound to GPU threads" if self.target.gpu else "")
            lines.append(f"kernels at N={n} ({what}; one build per plan serves every batch and length):")
            site = lambda i, node: f"  {node.op}{i}_fwd / {node.op}{i}_bwd   {_describe(node)}"  # noqa: E731
        for i, node in enumerate(postorder(planned.root)):
            if not isinstance(node, (Input, Position, Add)):       # these run no kernel of their own
                lines.append(site(i, node))
        for entry in self._build_log:
            lines.append(f"  build {entry}")
        lines += self._tuning_lines()
        for name, node in planned.stages:
            lines += ["", f"-- IR after {name} --", format_ir(node)]
        return "\n".join(lines)

    def _crossovers(self) -> list[tuple[int, int, int]]:
        """Which plan runs at which lengths, 1 … 65536, to the token: [(first N, last N, plan)]."""
        at = self._cheapest
        lo, hi = 1, LADDER[-1]
        spans, start, cur = [], lo, at(lo)
        while start <= hi:
            end = start                          # the last N of this plan: doubling, then bisection
            while end < hi and at(min(2 * end, hi)) == cur:
                end = min(2 * end, hi)
            if end < hi:
                a, b = end, min(2 * end, hi)     # plan cur at a, another at b
                while b - a > 1:
                    mid = (a + b) // 2
                    a, b = (mid, b) if at(mid) == cur else (a, mid)
                end = a
            spans.append((start, end, cur))
            start = end + 1
            cur = at(start) if start <= hi else cur
        return spans

    def _ranges(self) -> str:
        hi = LADDER[-1]
        return " · ".join(f"N {a}–{b}: {self._label(i)}" if b < hi else f"N ≥ {a}: {self._label(i)}"
                          for a, b, i in self._spans)

    def _tuning_lines(self) -> list[str]:
        lines = []
        for (i, dtype), (dirs, tuned) in self._tuning.items():
            if not dirs:
                why = "tuned=False" if not self.tuned else "no tuning database; `attndsl tune` makes one"
                lines.append(f"  tuning {dtype}: default knobs ({why})")
            elif not tuned:
                lines.append(f"  tuning {dtype}: default knobs (no better record in {', '.join(map(str, dirs))})")
            for kernel, c in tuned.items():
                knobs = " ".join(f"{k}={v}" for k, v in c["knobs"].items())
                lengths = ",".join(map(str, c["lengths"]))
                lines.append(f"  tuning {dtype}: {kernel} {knobs}  ({c['speedup']:.2f}x the defaults "
                             f"at N={lengths}; record from {c['db']})")
        return lines

    def extra_repr(self) -> str:
        forms = ", ".join(d.form for d in self.planned.decisions)
        return f"{self.spec.name}: heads={self.heads}, head_dim={self.head_dim}, forms=[{forms}]"


def _kernel_dtype(dtype) -> str | None:
    """compile(dtype=...) -> the kernel dtype to build now ("float32", "float64") or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    dtype = UPCAST.get(dtype, dtype)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.float64, torch.float16, torch.bfloat16 "
                         f"or None (build at the first call), got {dtype!r}")
    return KERNEL_DTYPES[dtype]


def _position_text(pos) -> str:
    from .expr import to_text
    if pos.name == "window":
        inner = "0" if pos["within"] == "none" else pos["within"]
        return f"{inner} for |r| ≤ {pos['size']}, -inf beyond (sliding window)"
    if pos.name == "tabulated":
        return f"{to_text(pos.expr)} (with params: tabulated per call over every r)"
    return to_text(pos.expr) if pos.expr is not None else pos.name


def _describe(node: Node) -> str:
    if isinstance(node, FeatureMap):
        return f"φ = {node.kernel.name} ({node.role}), width {node.width}, prescale {node.prescale:.4g}"
    if isinstance(node, SoftmaxAttention):
        what = "none" if node.bias is None else _position_text(node.bias.position)
        return f"form {node.form}, causal={node.causal}, scale {node.scale:.4g}, b(r) = {what}"
    if isinstance(node, SampledAttention):
        return f"form {node.form}, causal={node.causal}, scale {node.scale:.4g}, sampling {format_attr(node.sampling)}"
    floor = f", eps {node.eps:.4g}" if getattr(node, "eps", None) else ""
    if isinstance(node, (PositionalAttention, ToeplitzValues)):
        return f"form {node.form}, causal={node.causal}, b(r) = {_position_text(node.bias.position)}{floor}"
    if isinstance(node, LinearAttention):
        fused = f", φ = {node.phi.name} fused in (prescale {node.prescale:.4g})" if node.phi else ""
        return f"form {node.form}, causal={node.causal}{fused}{floor}"
    return ""


# --- the executor: one torch op per IR node ---------------------------------------------------------

# each runner: (node, its children's values, library key, kernel name, module parameters); a form
# site runs its record's (lowering/forms/)
RUNNERS = {FeatureMap: feature_map.run, Add: lambda node, args, *_: args[0] + args[1]}


@dataclass(frozen=True)
class Step:
    """One node of a plan, in post-order: `source` names the env entry an input or the position
    parameters read, else `run` computes it from the values of the steps `args`."""
    node: Node
    source: str | None
    run: object
    args: tuple[int, ...]
    kernel: str


def program(root: Node) -> tuple[Step, ...]:
    """The plan as a list of steps, built once per plan (walking and hashing the frozen IR on every
    call costs more than a small call's kernels)."""
    order = postorder(root)
    # keyed by value, as postorder dedups: an equal subtree built twice is one step
    index = {n: i for i, n in enumerate(order)}
    steps = []
    for i, node in enumerate(order):
        source = node.name if isinstance(node, Input) else "position" if isinstance(node, Position) else None
        run = None if source else RUNNERS.get(type(node)) or form_of(node).run
        steps.append(Step(node, source, run, tuple(index[c] for c in node.children()), f"{node.op}{i}"))
    return tuple(steps)


def _execute(steps: tuple[Step, ...], env: dict, lib: str, params: dict) -> torch.Tensor:
    values: list = []
    for st in steps:
        if st.source is not None:
            values.append(env[st.source])
        else:
            values.append(st.run(st.node, [values[a] for a in st.args], lib, st.kernel, params))
    return values[-1]
