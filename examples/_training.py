"""What the training examples share: the model, the options, the batches, the training loop and the MoBA checks.

``examples/train.py`` (one process) and ``examples/train_distributed.py`` (DDP, FSDP2) are the examples; this module is
their common library, so that each of them reads as what it shows. It builds the model to train (a tiny Hugging Face
preset, a ``config.json``, a local checkpoint, or the byte-level GPT of ``examples/reproduce``) as a :class:`CausalLM`,
adds and checks the command-line options both scripts take, loads the training policy with ``num_layers`` set to the
model's, yields the batches of the offline corpus of ``examples/reproduce`` (a pure function of ``(seed, step)``), runs
the optimizer steps (:func:`train_steps`), and counts the real executions of the MoBA op (:func:`moba_counts`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # imported by a script run from a checkout: examples.reproduce lives at the root
    sys.path.insert(0, str(_REPO))

import moba_compile  # noqa: E402
from examples.reproduce import corpus as corpus_mod  # noqa: E402
from moba_compile import ops  # noqa: E402
from moba_compile.hf.models import PRESETS, CliError, build_hf_model  # noqa: E402
from moba_compile.report import Report  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is optional; without it there is no progress bar
    tqdm = None

__all__ = [
    "DEFAULT_POLICY_FILE",
    "DENSE_POLICY",
    "DTYPES",
    "CausalLM",
    "StepLog",
    "add_common_args",
    "autocast",
    "build",
    "build_model",
    "check_common_args",
    "default_compiler",
    "default_device",
    "describe",
    "load_train_policy",
    "make_optimizer",
    "moba_counts",
    "moba_implementations",
    "packed_counts",
    "packed_step_batch",
    "print_reports",
    "step_batch",
    "train_steps",
    "user_error",
]

#: The policy used without ``--policy``: chunk 2048, top-3, the last 3 layers dense (the MoBA paper's hybrid setting).
DEFAULT_POLICY_FILE = _REPO / "examples" / "policies" / "hybrid.toml"

#: Every attention layer dense: the baseline compiled through the same backend (and compiler) as the MoBA run.
DENSE_POLICY: dict[str, Any] = {"version": 1, "rules": [{"module": "re:.*", "mode": "dense"}]}

#: ``--dtype`` values: the autocast dtype (weights and optimizer states stay float32).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_COMPILERS = ("inductor", "aot_eager", "eager")
_GPT_SHAPE = {"n_layers": 4, "d_model": 128, "n_heads": 4}


@dataclass
class CausalLM:
    """A model to train, with what the training loop and the distributed wrappers need to know about it.

    Attributes:
        module: the model (``nn.Module``), on the CPU, in training mode.
        blocks: its decoder layers (the ``nn.ModuleList`` FSDP2 shards one by one).
        blocks_path: the module path of ``blocks`` (``"model.layers"`` for transformers models, ``"layers"`` for GPT).
        hf: True for a transformers model (called with ``input_ids=`` and ``labels=``), False for the reproduce GPT
            (called as ``model(inputs, targets)``, returning the per-token loss).
        vocab_size: the model's vocabulary.
        description: one line for the log.
        call_kwargs: extra keyword arguments of every call of a transformers model (the FSDP2 path of
            ``train_distributed.py`` passes ``use_cache=False``: a KV cache object in the layers' inputs makes Dynamo
            recompile every layer).
    """

    module: nn.Module
    blocks: nn.ModuleList
    blocks_path: str
    hf: bool
    vocab_size: int
    description: str
    call_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """The number of decoder layers (one attention call each)."""
        return len(self.blocks)

    def attention_path(self, index: int) -> str:
        """The module path of layer ``index``'s attention, as the backend reports it for a whole-model graph.

        Args:
            index: the layer.

        Returns:
            ``"<blocks_path>.<index>.<name>"`` where ``<name>`` is the layer's first child whose class name ends with
            ``Attention`` (``self_attn`` in transformers models, ``attn`` in the GPT); the layer's own path if none.
        """
        block = self.blocks[index]
        path = f"{self.blocks_path}.{index}"
        for name, child in block.named_children():
            if type(child).__name__.endswith("Attention"):
                return f"{path}.{name}"
        return path

    def loss(self, fn: Callable[..., Any], inputs: Tensor, targets: Tensor) -> Tensor:
        """The mean next-token loss of one batch, computed by ``fn`` (the model, compiled or wrapped).

        Args:
            fn: what to call: the compiled model, or a DDP/FSDP2 wrapper of it.
            inputs: ``int64 [B, L]`` token ids. targets: ``int64 [B, L]``, ``inputs`` shifted by one.

        Returns:
            A scalar float32 tensor: the mean cross-entropy in nats. A transformers model gets ``labels=inputs``
            (it shifts them itself, so its last position is not scored and ``targets`` is unused).
        """
        if self.hf:
            return fn(input_ids=inputs, labels=inputs, **self.call_kwargs).loss.float()
        return fn(inputs, targets).float().mean()

    def packed_loss(self, fn: Callable[..., Any], inputs: Tensor, labels: Tensor, position_ids: Tensor) -> Tensor:
        """The mean next-token loss of one packed row (a transformers model only), computed by ``fn``.

        ``position_ids`` restart at 0 at every document, which is how transformers recognises packed documents: its
        SDPA path then builds the block-diagonal causal mask, and MoBA runs every document on its own. The model is
        called with ``use_cache=False``: with a cache object transformers does not look for packed documents.

        Args:
            fn: the compiled model. inputs: ``int64 [1, T]`` token ids. labels: ``int64 [1, T]``, ``-100`` at every
                document's first token (nothing predicts it across the boundary). position_ids: ``int64 [1, T]``.

        Returns:
            A scalar float32 tensor: the mean cross-entropy in nats over the scored tokens.
        """
        if not self.hf:
            raise ValueError("packed documents need a transformers model (position ids); the GPT has none")
        kwargs = {**self.call_kwargs, "use_cache": False}
        return fn(input_ids=inputs, labels=labels, position_ids=position_ids, **kwargs).loss.float()


@dataclass
class StepLog:
    """Per-step results of a training run.

    Attributes:
        losses: the loss of every step (the mean over the whole batch, averaged over ranks in distributed runs).
        times: the wall time of every step in seconds (the first includes compilation).
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)

    def step_time(self) -> float:
        """The median wall time of the steps after the first (which compiles), in seconds.

        Returns:
            The median; NaN when there is only one step.
        """
        rest = self.times[1:]
        return statistics.median(rest) if rest else math.nan


def default_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"``.

    Returns:
        The device name.
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_compiler(device: torch.device) -> str:
    """The backend's ``compiler`` option when ``--compiler`` is not given: Inductor on CUDA, ``aot_eager`` elsewhere.

    ``aot_eager`` (AOTAutograd without code generation) keeps the CPU compile time to a few seconds.

    Args:
        device: where the model trains.

    Returns:
        ``"inductor"`` or ``"aot_eager"``.
    """
    return "inductor" if device.type == "cuda" else "aot_eager"


def add_common_args(parser: argparse.ArgumentParser, *, batch_help: str = "sequences per step (%(default)s)") -> None:
    """Add the options shared by ``train.py`` and ``train_distributed.py``.

    ``--steps``, ``--seq-len``, ``--batch``, ``--lr``, ``--policy``, ``--model``, ``--dtype``, ``--device``,
    ``--compiler``, ``--seed``, ``--byte-offset``, ``--log-every``, ``--no-progress``.

    Args:
        parser: the parser to extend.
        batch_help: the help text of ``--batch``.
    """
    presets = ", ".join(PRESETS)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (%(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per sequence (%(default)s)")
    parser.add_argument("--batch", type=int, default=2, metavar="B", help=batch_help)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, constant (%(default)s)")
    parser.add_argument(
        "--policy",
        default=str(DEFAULT_POLICY_FILE),
        metavar="FILE",
        help="MoBA policy, .toml or .json (examples/policies/hybrid.toml)",
    )
    parser.add_argument(
        "--model",
        default="tiny-llama",
        metavar="MODEL",
        help=f"{presets}, a config.json, a local checkpoint directory, or gpt (tiny-llama)",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="float32, or bfloat16 mixed precision (%(default)s)"
    )
    parser.add_argument("--device", default=default_device(), help="cuda if available, else cpu")
    parser.add_argument(
        "--compiler",
        choices=_COMPILERS,
        default=None,
        help="the backend's compiler option (inductor on CUDA, aot_eager on CPU)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="data order; also the initialisation of --model gpt (%(default)s)"
    )
    parser.add_argument(
        "--byte-offset", type=int, default=0, metavar="N", help="token id of byte b is b + N (%(default)s)"
    )
    parser.add_argument("--log-every", type=int, default=0, metavar="N", help="print the loss every N steps (steps/10)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the shared options and fill in the defaults that depend on others (``--compiler``, ``--log-every``).

    Args:
        parser: the parser (its ``error`` exits with status 2). args: the parsed options, completed in place.
    """
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.byte_offset < 0:
        parser.error(f"--byte-offset must be >= 0, got {args.byte_offset}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.compiler is None:
        args.compiler = default_compiler(device)
    if args.log_every <= 0:
        args.log_every = max(1, args.steps // 10)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the first ``nn.ModuleList`` of the model (``model.layers`` in transformers, ``layers``)."""
    for name, child in model.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            return name, child
    raise CliError(f"{type(model).__name__}: no nn.ModuleList of decoder layers found")


def build_model(spec: str, *, seq_len: int, seed: int) -> CausalLM:
    """Build the model to train, on the CPU, in training mode, with float32 weights.

    Args:
        spec: ``"gpt"`` (the byte-level GPT of ``examples/reproduce``, seeded with ``seed``), a tiny preset name, a
            ``config.json`` path or a local model directory (see :func:`moba_compile.hf.models.build_hf_model`: random
            weights seeded with 0, or the directory's weights when it has any).
        seq_len: the training sequence length (the GPT's rotary tables are built for it).
        seed: seeds the GPT's initialisation.

    Returns:
        The :class:`CausalLM`.

    Raises:
        CliError: transformers is missing, the file does not exist, or transformers cannot build a causal LM from it.
    """
    if spec == "gpt":
        from examples.reproduce.config import RunConfig
        from examples.reproduce.model import GPT, VOCAB

        context = -(-seq_len // 16) * 16  # RunConfig wants a multiple of 16; the tables only need to be long enough
        cfg = RunConfig("train", context=context, **_GPT_SHAPE)
        torch.manual_seed(seed)
        model: nn.Module = GPT(cfg)
        shape = ", ".join(f"{k}={v}" for k, v in _GPT_SHAPE.items())
        what = f"GPT from examples/reproduce ({shape}, random weights, seed {seed})"
        vocab = VOCAB
        hf = False
    else:
        model, what = build_hf_model(spec, dtype=torch.float32, load_weights=True)
        vocab = int(model.config.vocab_size)
        hf = True
    model.train()
    path, blocks = _find_blocks(model)
    return CausalLM(module=model, blocks=blocks, blocks_path=path, hf=hf, vocab_size=vocab, description=what)


def load_train_policy(spec: str | dict[str, Any], num_layers: int) -> moba_compile.Policy:
    """Load a policy and set its ``num_layers`` to the model's when it is unset.

    The number of layers then never depends on what one compiled graph shows (graph breaks, DDP bucketing and
    per-block compilation all show fewer layers than the model has), so ``dense_last`` always means the model's last
    layers.

    Args:
        spec: a policy file path or dict. num_layers: the model's number of attention layers.

    Returns:
        The validated :class:`moba_compile.Policy`.

    Raises:
        moba_compile.PolicyError: the policy is missing or malformed.
    """
    policy = moba_compile.load_policy(spec)
    if policy.num_layers is None:
        policy = dataclasses.replace(policy, num_layers=num_layers)
    return policy


def step_batch(
    corpus: corpus_mod.Corpus, *, seed: int, step: int, batch: int, seq_len: int, byte_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """The global batch of one step: ``batch`` windows of the training corpus, a pure function of ``(seed, step)``.

    Args:
        corpus: the stdlib-bytes corpus. seed: the run's seed. step: 0-based step. batch: sequences.
        seq_len: tokens per sequence. byte_offset: added to every byte to give its token id.

    Returns:
        ``(inputs, targets)``, ``int64 [batch, seq_len]`` on the CPU; targets are inputs shifted by one.
    """
    inputs, targets = corpus_mod.train_batch(corpus, seed, step, batch, seq_len)
    return inputs + byte_offset, targets + byte_offset


def packed_step_batch(
    corpus: corpus_mod.Corpus,
    *,
    seed: int,
    step: int,
    total: int,
    min_doc: int,
    max_doc: int,
    byte_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """One packed row of ``total`` tokens: documents of the training corpus back to back, a pure function of
    ``(seed, step)``.

    Documents are windows of the training split with lengths drawn uniformly from ``[min_doc, max_doc]`` (the last
    one takes the remainder, so it may be shorter) at random offsets.

    Args:
        corpus: the stdlib-bytes corpus. seed: the run's seed. step: 0-based step. total: tokens in the row.
        min_doc, max_doc: the document length range, ``1 <= min_doc <= max_doc``. byte_offset: added to every byte.

    Returns:
        ``(inputs, labels, position_ids, lengths)``: ``int64 [1, total]`` token ids; the labels (the inputs, ``-100``
        at every document's first token so no document predicts across a boundary); position ids restarting at 0 at
        every document; the document lengths.

    Raises:
        ValueError: a bad length range, or a training split shorter than ``max_doc``.
    """
    if not 1 <= min_doc <= max_doc:
        raise ValueError(f"need 1 <= min_doc <= max_doc, got {min_doc}, {max_doc}")
    span = corpus.train.numel() - max_doc
    if span <= 0:
        raise ValueError(f"training split ({corpus.train.numel()} bytes) shorter than a document of {max_doc}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_777_777)
    docs, lengths, left = [], [], total
    while left > 0:
        n = min(int(torch.randint(min_doc, max_doc + 1, (), generator=gen)), left)
        offset = int(torch.randint(0, span, (), generator=gen))
        docs.append(corpus.train[offset : offset + n].long())
        lengths.append(n)
        left -= n
    inputs = torch.cat(docs)[None] + byte_offset
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = inputs.masked_fill(position_ids == 0, -100)
    return inputs, labels, position_ids, lengths


def packed_counts() -> int:
    """Documents run as MoBA so far in this process (forward): the ``attention:packed:*`` counts of ``ops.CALLS``.

    Returns:
        The number of (layer, document) forward executions of document-aware MoBA.
    """
    return sum(n for key, n in ops.CALLS.items() if key.startswith("attention:packed:"))


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` in ``dtype`` on ``device``, or nothing for float32.

    Args:
        device: where the model runs. dtype: ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        A context manager.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def moba_counts() -> tuple[int, int]:
    """Real executions of the MoBA op so far in this process, from ``moba_compile.ops.CALLS``.

    Returns:
        ``(forward, backward)``: the ``attention:*`` and ``attention_backward:*`` counts of every implementation
        (reference, triton, decode), without the op's dense fallbacks (``*:dense-sdpa``, a non-causal mask).
    """
    fwd = sum(n for key, n in ops.CALLS.items() if key.startswith("attention:") and not key.endswith(":dense-sdpa"))
    bwd = sum(
        n for key, n in ops.CALLS.items() if key.startswith("attention_backward:") and not key.endswith(":dense-sdpa")
    )
    return fwd, bwd


def moba_implementations() -> str:
    """The MoBA op's executions so far, per implementation, for the log (``"attention:reference x9, ..."``).

    Returns:
        ``"<key> xN"`` for every non-zero ``moba_compile.ops.CALLS`` entry of the op, comma separated; ``"none"``.
    """
    keys = sorted(key for key, n in ops.CALLS.items() if n and key.startswith("attention"))
    return ", ".join(f"{key} x{ops.CALLS[key]}" for key in keys) or "none"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if tqdm is None or not enabled:
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _say(message: str, bar: Any) -> None:
    if bar is not None:
        bar.write(message, file=sys.stdout)
    else:
        print(message, flush=True)


def train_steps(
    lm: CausalLM,
    fn: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    corpus: corpus_mod.Corpus,
    args: argparse.Namespace,
    *,
    steps: int,
    tag: str,
    device: torch.device,
    rows: slice = slice(None),
    reduce_loss: Callable[[Tensor], Tensor] | None = None,
    verbose: bool = True,
    use_autocast: bool = True,
) -> StepLog:
    """Train ``steps`` optimizer steps on the global batches of ``(args.seed, step)``.

    Each step: the batch (its ``rows`` only, for one rank of a distributed run), forward under autocast, backward,
    AdamW step; the device is synchronised before the step's time is read.

    Args:
        lm: the model. fn: what computes it (compiled, or a DDP/FSDP2 wrapper). optimizer: over ``lm``'s parameters.
        corpus: the training corpus. args: ``seed``, ``batch``, ``seq_len``, ``byte_offset``, ``dtype``,
            ``log_every``, ``no_progress``; with ``pack`` (``train.py --pack``) each step is one packed row of
            ``batch * seq_len`` tokens of documents of ``[min_doc, max_doc]`` tokens (:func:`packed_step_batch`).
        steps: how many steps. tag: names the run in the output (``[tag] step 3/20  loss ...``).
        device: where the model is. rows: the rows of the global batch this process trains on.
        reduce_loss: turns this process's loss into the global batch's (an all-reduce average across ranks).
        verbose: print the losses and show the progress bar (rank 0 only, in distributed runs).
        use_autocast: run the forward under :func:`autocast` in ``args.dtype``; False when the model handles the
            precision itself (FSDP2's ``MixedPrecisionPolicy``).

    Returns:
        The :class:`StepLog`.
    """
    log = StepLog()
    dtype = DTYPES[args.dtype] if use_autocast else torch.float32
    with _progress(steps, tag, verbose and not args.no_progress) as bar:
        for step in range(steps):
            start = time.perf_counter()
            if getattr(args, "pack", False):  # train.py --pack: one row of batch * seq_len tokens of documents
                inputs, labels, position_ids, _ = packed_step_batch(
                    corpus, seed=args.seed, step=step, total=args.batch * args.seq_len, min_doc=args.min_doc,
                    max_doc=args.max_doc, byte_offset=args.byte_offset,
                )  # fmt: skip
                with autocast(device, dtype):
                    loss = lm.packed_loss(fn, inputs.to(device), labels.to(device), position_ids.to(device))
            else:
                inputs, targets = step_batch(
                    corpus, seed=args.seed, step=step, batch=args.batch, seq_len=args.seq_len,
                    byte_offset=args.byte_offset,
                )  # fmt: skip
                inputs, targets = inputs[rows].to(device), targets[rows].to(device)
                with autocast(device, dtype):
                    loss = lm.loss(fn, inputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.detach()
            if reduce_loss is not None:
                value = reduce_loss(value)
            _sync(device)
            log.times.append(time.perf_counter() - start)
            log.losses.append(value.item())
            done = step + 1
            if verbose and (done % args.log_every == 0 or done == steps or step == 0):
                _say(f"[{tag}] step {done}/{steps}  loss {log.losses[-1]:.4f}  ({log.times[-1]:.3f} s)", bar)
            if bar is not None:
                bar.set_postfix(loss=f"{log.losses[-1]:.3f}", refresh=False)
                bar.update(1)
    return log


def make_optimizer(module: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over every parameter of ``module`` (betas 0.9/0.95, weight decay 0.1 on matrices only).

    Args:
        module: the model (or its FSDP2-sharded form). lr: the learning rate.

    Returns:
        The optimizer.
    """
    decay = [p for p in module.parameters() if p.dim() >= 2]
    rest = [p for p in module.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def print_reports(reports: list[Report], heading: str) -> None:
    """Print the backend's report of every graph compiled during a run.

    Args:
        reports: from :func:`moba_compile.backend.collect_reports`. heading: a line printed first.
    """
    print(heading)
    for report in reports:
        if report.sites:
            print(report)


def build(args: argparse.Namespace) -> tuple[CausalLM, moba_compile.Policy]:
    """Build the model and load the training policy a parsed command line names (``--model``, ``--policy``, ...).

    Args:
        args: the options of :func:`add_common_args`, checked by :func:`check_common_args`.

    Returns:
        ``(lm, policy)``: the model on the CPU (seeded: every call builds the same initial weights) and the policy
        with ``num_layers`` set (:func:`load_train_policy`).

    Raises:
        CliError: the model cannot be built, or its vocabulary is smaller than ``256 + --byte-offset``.
        moba_compile.PolicyError: the policy is missing or malformed.
    """
    lm = build_model(args.model, seq_len=args.seq_len, seed=args.seed)
    policy = load_train_policy(args.policy, lm.num_layers)
    if args.byte_offset + 256 > lm.vocab_size:
        raise CliError(f"{args.model}: vocabulary {lm.vocab_size} < 256 + --byte-offset {args.byte_offset}")
    return lm, policy


def describe(lm: CausalLM, policy: moba_compile.Policy) -> None:
    """Print the model and policy lines that start every training log.

    Args:
        lm: the model. policy: the training policy.
    """
    print(f"model: {lm.description}, {lm.num_layers} layers at {lm.blocks_path}")
    print(f"policy: {policy.source} (num_layers = {policy.num_layers})")


def user_error(err: Exception) -> int:
    """Report a user error (bad model, missing file, malformed policy) as one line on stderr.

    Args:
        err: the error; its message is printed with its whitespace collapsed.

    Returns:
        2, the exit status of a user error.
    """
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
