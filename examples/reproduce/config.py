"""Run configuration: one :class:`RunConfig` per training run, and the attention plan it implies per layer.

A run trains with one of two attention phases per step:

- ``"moba"``: ``torch.compile(model, backend="moba", options={"policy": P, "compiler": ..., "impl": ...})`` where ``P``
  is ``RunConfig.policy`` (a policy file path or dict) or, when that is unset, the dict built from ``chunk_size``,
  ``topk`` and ``dense_last`` (see :func:`moba_policy`);
- ``"full"``: full (dense causal) attention, either through the same ``moba`` backend with a policy that keeps every
  layer dense (``full_backend = "moba-dense"``, the default: both phases go through one compile path) or through plain
  ``torch.compile`` (``full_backend = "torch"``).

``attention = "full"`` trains every step in the full phase. ``attention = "moba"`` trains in the MoBA phase, except the
last ``switch_to_full_frac`` of the steps, which run the full phase (the paper's two-stage hybrid).

A run with ``init_from = "<run>"`` starts from that run's final weights instead of a fresh initialisation (a trained
model converted to another attention): weights only, with a fresh optimizer and learning-rate schedule. ``steps = 0``
is allowed there and means evaluate only: one validation record at step 0, read like a trained run's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from moba_compile import load_policy

from .corpus import CORPORA

__all__ = [
    "ATTENTIONS",
    "COMPILERS",
    "FULL_BACKENDS",
    "LayerPlan",
    "RunConfig",
    "apply_overrides",
    "dense_policy",
    "eval_phase",
    "layer_plan",
    "moba_policy",
    "phase_at",
    "switch_step",
]

ATTENTIONS = ("moba", "full")
FULL_BACKENDS = ("moba-dense", "torch")
COMPILERS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run (its results depend on nothing else but the corpus and hardware).

    Attributes:
        name: run name; also its directory under ``<out>/runs/``.
        n_layers, d_model, n_heads, mlp_ratio: the model (head dim ``d_model / n_heads``; the Triton kernels need a
            power of two in 16..256).
        context: tokens per training sequence. batch_size: sequences per optimizer step. micro_batch: sequences per
            forward pass (gradient accumulation); 0 means ``batch_size``.
        val_permille: files per thousand held out for validation (see :mod:`examples.reproduce.corpus`).
        corpus: which corpus: ``"stdlib"`` (the Python standard library's sources) or ``"stdlib+site-packages"`` (also
            the installed packages' sources; see :mod:`examples.reproduce.corpus`).
        steps: optimizer steps. lr: peak learning rate (AdamW, betas 0.9/0.95). min_lr_ratio: final LR / peak (cosine
            decay after a linear warmup of ``warmup_steps``). weight_decay: on matrices only. grad_clip: max grad norm.
        seed: seeds the initialisation and the data order (MoBA and full runs with one seed see identical batches).
        attention: ``"moba"`` or ``"full"``. chunk_size, topk, dense_last: the MoBA policy when ``policy`` is unset.
        switch_to_full_frac: the last fraction of the steps trained with full attention (MoBA runs only).
        policy: a policy file path or dict for the MoBA phase, overriding ``chunk_size``/``topk``/``dense_last``.
        full_backend: ``"moba-dense"`` or ``"torch"`` (see the module docstring).
        compiler: what compiles the graph: ``"inductor"``, ``"aot_eager"`` (no code generation; fast to compile, used
            by the smoke mode) or ``"eager"``.
        impl: the MoBA implementation (``"auto"``, ``"triton"``, ``"reference"``).
        eval_every, eval_batches: validation every this many steps (and at the end), over this many micro-batches.
        log_every: a log record every this many steps. ckpt_every: a checkpoint every this many steps (and at the end).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        amp: bfloat16 autocast on CUDA (ignored on the CPU, which trains in float32).
        init_from: the name of a run (in the same output directory) whose final checkpoint gives the initial weights;
            None: a fresh initialisation from ``seed``. With it, ``steps`` may be 0 (evaluate only).
        notes: free-form metadata, not part of the run's identity.

    Raises:
        ValueError: on construction, for an unknown ``attention``/``full_backend``/``compiler``/``corpus``, a width not
            divisible into even head dims, a batch not divisible into micro-batches, a switch fraction outside [0, 1)
            or on a full-attention run, a context not a multiple of 16, a count below 1 (``steps`` may be 0 with
            ``init_from``), or ``init_from`` naming the run itself.
    """

    name: str
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    mlp_ratio: int = 4
    context: int = 8192
    batch_size: int = 16
    micro_batch: int = 0
    val_permille: int = 50
    corpus: str = "stdlib"
    steps: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    attention: str = "moba"
    chunk_size: int = 512
    topk: int = 3
    dense_last: int = 0
    switch_to_full_frac: float = 0.0
    policy: str | dict[str, Any] | None = None
    full_backend: str = "moba-dense"
    compiler: str = "inductor"
    impl: str = "auto"
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    ckpt_every: int = 100
    device: str = "auto"
    amp: bool = True
    init_from: str | None = None
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"{self.name}: attention={self.attention!r}; allowed: {', '.join(ATTENTIONS)}")
        if self.full_backend not in FULL_BACKENDS:
            raise ValueError(f"{self.name}: full_backend={self.full_backend!r}; allowed: {', '.join(FULL_BACKENDS)}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"{self.name}: compiler={self.compiler!r}; allowed: {', '.join(COMPILERS)}")
        if self.corpus not in CORPORA:
            raise ValueError(f"{self.name}: corpus={self.corpus!r}; allowed: {', '.join(CORPORA)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"{self.name}: d_model {self.d_model} / n_heads {self.n_heads} must be an even integer")
        if self.batch_size % self.micro:
            raise ValueError(f"{self.name}: batch_size {self.batch_size} is not a multiple of micro_batch {self.micro}")
        if not 0.0 <= self.switch_to_full_frac < 1.0:
            raise ValueError(f"{self.name}: switch_to_full_frac must be in [0, 1), got {self.switch_to_full_frac}")
        if self.attention == "full" and self.switch_to_full_frac:
            raise ValueError(f"{self.name}: switch_to_full_frac only applies to attention='moba'")
        if self.context % 16:
            raise ValueError(f"{self.name}: context {self.context} must be a multiple of 16 (trailing 1/16)")
        if self.init_from is not None and self.init_from == self.name:
            raise ValueError(f"{self.name}: init_from names the run itself")
        if self.steps < (0 if self.init_from is not None else 1):
            raise ValueError(f"{self.name}: steps must be >= 1 (0, evaluate only, needs init_from)")
        for key in ("eval_every", "eval_batches", "log_every", "ckpt_every", "context", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{self.name}: {key} must be >= 1")

    @property
    def micro(self) -> int:
        """Sequences per forward pass (``micro_batch``, or ``batch_size`` when 0)."""
        return self.micro_batch or self.batch_size

    @property
    def head_dim(self) -> int:
        """``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def tokens_per_step(self) -> int:
        """Predicted tokens per optimizer step: ``batch_size * context``."""
        return self.batch_size * self.context

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict (what run logs and checkpoints store).

        Returns:
            ``dataclasses.asdict(self)``.
        """
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the results: :meth:`to_dict` without ``name``, ``notes`` and bookkeeping.

        Two configs with equal identity train identical models (on the same corpus and hardware). Used to refuse
        resuming a run whose configuration changed, and to check a reused run. ``init_from`` is left out when unset,
        and ``corpus`` when it is the default ``"stdlib"``, so the identities of logs written before these fields
        existed still match.

        Returns:
            A dict.
        """
        out = self.to_dict()
        for key in ("name", "notes", "log_every", "ckpt_every", "device"):
            out.pop(key)
        if out["init_from"] is None:
            out.pop("init_from")
        if out["corpus"] == "stdlib":
            out.pop("corpus")
        return out


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` overrides (from ``--set``), converting each value to the field's type.

    Args:
        cfg: the configuration. overrides: strings such as ``"micro_batch=4"``, ``"lr=1e-3"``, ``"amp=false"``,
            ``"policy=examples/policies/hybrid.toml"``.

    Returns:
        A new validated :class:`RunConfig`.

    Raises:
        ValueError: a malformed override, an unknown key, or a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields or key in ("name", "notes"):
            allowed = ", ".join(k for k in fields if k not in ("name", "notes"))
            raise ValueError(f"bad override {item!r}: expected key=value with key in {allowed}")
        current = getattr(cfg, key)
        value: Any
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"override {item!r}: {key} takes true or false")
            value = raw.lower() in ("true", "1", "yes")
        elif isinstance(current, int):
            value = int(raw)
        elif isinstance(current, float):
            value = float(raw)
        elif key == "policy":
            value = None if raw in ("", "none", "None") else os.path.abspath(raw)
        elif key == "init_from":
            value = None if raw in ("", "none", "None") else raw
        else:
            value = raw
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def moba_policy(cfg: RunConfig) -> str | dict[str, Any]:
    """The policy of the MoBA phase: ``cfg.policy`` when set, else ``chunk_size``/``topk``/``dense_last`` as a dict.

    Args:
        cfg: the run.

    Returns:
        A policy file path or a policy dict (``num_layers`` set, so ``dense_last`` never depends on graph breaks).
    """
    if cfg.policy is not None:
        return cfg.policy
    return {
        "version": 1,
        "chunk_size": cfg.chunk_size,
        "topk": cfg.topk,
        "dense_last": cfg.dense_last,
        "num_layers": cfg.n_layers,
    }


def dense_policy(cfg: RunConfig) -> dict[str, Any]:
    """The policy of the full phase under ``full_backend = "moba-dense"``: every layer dense (``dense_last=n_layers``).

    Args:
        cfg: the run.

    Returns:
        A policy dict.
    """
    return {"version": 1, "dense_last": cfg.n_layers, "num_layers": cfg.n_layers}


def switch_step(cfg: RunConfig) -> int:
    """The first step (0-based) trained with full attention; ``cfg.steps`` when the run never switches.

    Args:
        cfg: the run.

    Returns:
        ``0`` for full-attention runs; ``steps - round(steps * switch_to_full_frac)`` for MoBA runs.
    """
    if cfg.attention == "full":
        return 0
    return cfg.steps - int(math.floor(cfg.steps * cfg.switch_to_full_frac + 0.5))


def phase_at(cfg: RunConfig, step: int) -> str:
    """The attention phase of 0-based ``step``: ``"moba"`` or ``"full"``.

    Args:
        cfg: the run. step: 0-based optimizer step.

    Returns:
        ``"full"`` from :func:`switch_step` on, ``"moba"`` before.
    """
    return "full" if step >= switch_step(cfg) else "moba"


def eval_phase(cfg: RunConfig, done: int) -> str:
    """The attention phase a validation after ``done`` steps runs in: that of the last step, or at step 0 the first.

    Args:
        cfg: the run. done: steps completed (0 for an evaluate-only run).

    Returns:
        ``phase_at(cfg, done - 1)``; for ``done == 0``, ``"moba"`` for MoBA runs and ``"full"`` for full ones (a
        0-step MoBA run has ``switch_step`` 0, but evaluates the converted model with MoBA).
    """
    if done == 0:
        return "moba" if cfg.attention == "moba" else "full"
    return phase_at(cfg, done - 1)


@dataclass(frozen=True)
class LayerPlan:
    """What one attention layer runs in a phase: ``mode`` ``"moba"`` (with ``chunk_size``, ``topk``) or ``"dense"``."""

    mode: str
    chunk_size: int | None = None
    topk: int | None = None


def layer_plan(cfg: RunConfig, phase: str) -> list[LayerPlan]:
    """Per-layer attention of a phase, decided by the same policy object the backend uses (for FLOP accounting).

    The trainer checks this plan against the backend's own report after each compilation, so the FLOP count always
    describes what actually ran.

    Args:
        cfg: the run. phase: ``"moba"`` or ``"full"``.

    Returns:
        One :class:`LayerPlan` per layer ``layers.N.attn``.

    Raises:
        moba_compile.PolicyError: the MoBA policy is malformed.
    """
    if phase == "full":
        return [LayerPlan("dense") for _ in range(cfg.n_layers)]
    policy = load_policy(moba_policy(cfg))
    plan = []
    for i in range(cfg.n_layers):
        d = policy.decide(f"layers.{i}.attn", i, cfg.n_layers)
        plan.append(LayerPlan("moba", d.chunk_size, d.topk) if d.mode == "moba" else LayerPlan("dense"))
    return plan
