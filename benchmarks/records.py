"""The typed records a benchmark run writes to its JSON, and its configuration.

Rows hold what was measured (seconds, bytes, rounds) and nothing derived:
the ratios and GB/s of the tables are computed by ``report.py``. This
module imports no JAX, so the report runs anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Candidates of sections 1 and 4 (the ``impl`` of a ClipRow).
OPTAXCLIP = "optaxclip"
# The "rule" of the global clip that records each tensor's norm: not a rule,
# but read against the same clip without it, as a rule is.
PER_TENSOR_STATS = "per_tensor_stats"
OPTAX = "optax"
STATE_DROPPED = "optaxclip, state dropped"
REF_CLIP = "ref measure+scale"
REF_COPY = "ref copy"
TORCH = "torch foreach"
MODES = ("plain", "donated")
# Section 5's rows of a guard around muon, skipping or applying every step.
GUARD = "optaxclip guard, muon"


@dataclass(frozen=True)
class Config:
    """What one run measures; ``FULL`` and ``QUICK`` below, flags override."""

    sizes: tuple[int, ...]  # section 1: parameters per tree
    leaves: tuple[int, ...]  # section 1: leaves per tree
    repeats: int  # least number of timed rounds per row
    row_budget_s: float  # seconds of extra rounds a cheap row may take
    step_size: int  # section 2: parameters of the adamw step
    step_leaves: int
    compile_leaves: tuple[int, ...]  # section 3: leaf counts
    compile_timeout_s: float  # section 3: limit of each compiling process
    compile_shared_process: bool  # section 3: one process for every method
    compile_rules: bool  # section 3: a row per adaptive rule, not only fixed
    lowp_size: int  # section 4: parameters of the 16-bit trees
    lowp_leaves: int
    copy_bytes: int  # size of the array whose copy gives the bandwidth
    train_models: tuple[str, ...]  # section 5: model sizes (train_step.MODELS)
    train_rounds: int  # section 5: timed rounds per model
    seed: int  # seeds the random candidate order of every interleaved round


FULL = Config(
    sizes=(100_000, 1_000_000, 10_000_000, 50_000_000),
    leaves=(1, 16, 256),
    repeats=21,
    row_budget_s=3.0,
    step_size=10_000_000,
    step_leaves=16,
    compile_leaves=(10, 100, 1000, 5000),
    compile_timeout_s=120.0,
    compile_shared_process=False,
    compile_rules=True,
    lowp_size=10_000_000,
    lowp_leaves=16,
    copy_bytes=2**31,
    train_models=("1M", "4M"),
    train_rounds=21,
    seed=0,
)
QUICK = Config(
    sizes=(10_000,),
    leaves=(1, 4),
    repeats=5,
    row_budget_s=0.0,
    step_size=10_000,
    step_leaves=2,
    compile_leaves=(2, 8),
    compile_timeout_s=120.0,
    compile_shared_process=True,
    compile_rules=False,
    lowp_size=10_000,
    lowp_leaves=4,
    copy_bytes=2**22,
    train_models=("tiny",),
    train_rounds=2,
    seed=0,
)


@dataclass(frozen=True)
class ClipRow:
    """Sections 1 and 4: one candidate clipping one tree, plain or donated."""

    section: int
    dtype: str
    params: int
    leaves: int
    mode: str  # one of MODES
    impl: str  # OPTAXCLIP, OPTAX, STATE_DROPPED, REF_CLIP, REF_COPY or TORCH
    seconds: float  # median seconds per call
    rounds: int
    grad_bytes: int  # bytes of the gradient tree
    bytes_moved: int  # bytes read + written per call
    peak_bytes: int | None = None  # of the donated executable, where reported


@dataclass(frozen=True)
class StepRow:
    """Section 2: one clip in front of adamw, in a jitted step."""

    section: int
    method: str  # the table's label
    library: str  # "optaxclip", "optax" or "none" (bare adamw)
    scope: str | None
    rule: str | None  # None: a fixed threshold
    params: int
    leaves: int
    seconds: float
    rounds: int


@dataclass(frozen=True)
class CompileRow:
    """Section 3: trace + compile of one jitted update, in a fresh process."""

    section: int
    method: str
    library: str
    scope: str | None
    rule: str | None
    with_adamw: bool  # chain(clip, adamw), or the clip on its own
    leaves: int
    trace_s: float | None  # None: stopped by the time limit before this row
    compile_s: float | None
    peak_rss_mb: float | None


@dataclass(frozen=True)
class TrainRow:
    """Section 5: a whole transformer train step, with one clip or none."""

    section: int
    model: str  # the model's name (a key of train_step.MODELS)
    params: int
    leaves: int
    layers: int
    d_model: int
    heads: int
    vocab: int
    batch: int
    seq_len: int
    method: str  # the table's label
    library: str  # "optaxclip", "optax", "none" (the step without a clip) or GUARD
    seconds: float  # median seconds per step
    rounds: int
    round_seconds: list[float]  # each round's seconds, in the order of the rounds


Row = ClipRow | StepRow | CompileRow | TrainRow
_ROW_TYPES: dict[int, type] = {
    1: ClipRow,
    2: StepRow,
    3: CompileRow,
    4: ClipRow,
    5: TrainRow,
}


def row_from_dict(data: dict[str, Any]) -> Row:
    """The record a JSON row was written from; a clear error for a bad row."""
    section = data.get("section")
    if section not in _ROW_TYPES:
        raise ValueError(f"a row's 'section' must be 1, 2, 3, 4 or 5, got {data!r}")
    kind = _ROW_TYPES[section]
    names = {f.name for f in dataclasses.fields(kind)}
    missing = (
        names
        - set(data)
        - {
            f.name
            for f in dataclasses.fields(kind)
            if f.default is not dataclasses.MISSING
        }
    )
    if missing or set(data) - names:
        raise ValueError(
            f"a section-{section} row has the fields {sorted(names)}; got "
            f"{sorted(data)} (missing {sorted(missing)})"
        )
    return kind(**data)


def row_to_dict(row: Row) -> dict[str, Any]:
    """The JSON form of a row."""
    return dataclasses.asdict(row)
