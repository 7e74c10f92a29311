"""The ``moba-compile`` console command (also ``python -m moba_compile``).

``moba-compile explain`` builds a model, runs :func:`moba_compile.explain` on random inputs and prints the report: for
every ``scaled_dot_product_attention`` call, its layer, module path, decision (``moba`` or ``dense``), chunk size, top-k
and the reason.

    moba-compile explain --hf-config tiny-llama --policy examples/policies/hybrid.toml --seq-len 512
    moba-compile explain --hf-config path/to/model_dir --mask-form
    moba-compile explain --factory mypkg.models:build --input-shape 2,1024
    moba-compile explain --hf-config tiny-llama --json    # the report as JSON (Report.to_dict())
    moba-compile --version

Errors a user can fix (a missing file, a bad ``--factory`` string or a factory that needs arguments, a malformed
policy, transformers not installed, an ``--impl`` the backend 'moba' cannot run here) are printed as one line on stderr
and the command exits with status 2.

The Hugging Face models it builds come from :mod:`moba_compile.hf.models` (presets, ``load_hf_config``,
``build_hf_model``, ``hf_example_inputs``), which the examples and benchmarks use too. transformers is imported lazily:
it is an optional extra (``moba-compile[hf]``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .backend import COMPILERS
from .hf.models import PRESETS, CliError, _first_line, build_hf_model, hf_example_inputs
from .ops import IMPLS
from .policy import PolicyError, load_policy

__all__ = ["CliError", "build_factory_model", "load_factory", "main", "parse_shape"]

PROG = "moba-compile"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HF_FLAGS = {"--seq-len": "seq_len", "--batch": "batch", "--mask-form": "mask_form", "--dtype": "dtype"}


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve a ``module:function`` (or ``path/to/file.py:function``) string to the function.

    The current directory is searched first for the module, as ``python -m`` would.

    Args:
        spec: ``"package.module:function"`` or ``"path/to/file.py:function"``.

    Returns:
        The callable (it is not called).

    Raises:
        CliError: the string is malformed, the module cannot be imported, the file does not exist, or the attribute is
            missing or not callable. (Other exceptions raised while importing the module propagate.)

    Example:
        >>> load_factory("collections:OrderedDict").__name__
        'OrderedDict'
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise CliError(f"bad --factory {spec!r}: expected module:function (e.g. mypkg.models:build_model)")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise CliError(f"--factory {spec!r}: {module_name}: no such file")
        name = "_moba_factory_" + Path(module_name).stem
        file_spec = importlib.util.spec_from_file_location(name, module_name)
        if file_spec is None or file_spec.loader is None:
            raise CliError(f"--factory {spec!r}: cannot import {module_name}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        file_spec.loader.exec_module(module)
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise CliError(f"--factory {spec!r}: cannot import {module_name!r}: {_first_line(err)}") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CliError(f"--factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CliError(f"--factory {spec!r}: {attr!r} is not callable ({type(target).__name__})")
    return target


def _check_callable_without_arguments(spec: str, factory: Callable[..., Any]) -> None:
    """Raise a :class:`CliError` naming the parameters when ``factory()`` cannot bind (instead of its TypeError)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: the call itself will tell
        return
    try:
        signature.bind()
    except TypeError:
        required = [
            name
            for name, param in signature.parameters.items()
            if param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        ]
        raise CliError(
            f"--factory {spec!r}: it needs arguments ({', '.join(required)}), but it is called without any; "
            "give them defaults or point --factory at a function without parameters"
        ) from None


def _random_input(model: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """Token ids below the first ``nn.Embedding``'s size when the model has one, else standard normal floats."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(model, torch.nn.Module):
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                return torch.randint(0, module.num_embeddings, shape, generator=generator)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    else:
        dtype = torch.float32
    return torch.randn(shape, generator=generator).to(dtype)


def build_factory_model(spec: str, input_shape: tuple[int, ...] | None) -> tuple[Any, tuple[Any, ...], str]:
    """Call a ``--factory`` function and settle the example inputs.

    Args:
        spec: as for :func:`load_factory`. The function takes no arguments and returns a model (an ``nn.Module`` or
            any callable torch.compile accepts) or a ``(model, example_args)`` pair (``example_args`` a tuple, or a
            single tensor).
        input_shape: when given, one random input of this shape replaces any example arguments: int64 token ids below
            ``num_embeddings`` of the model's first ``nn.Embedding`` if it has one, else standard normal floats in the
            dtype of its first floating parameter.

    Returns:
        ``(model, args, description)``; an ``nn.Module`` is switched to ``eval()`` (dropout off, as in inference).

    Raises:
        CliError: as :func:`load_factory`; the function has parameters without defaults; it returned something else;
            or it returned a bare model and no ``input_shape`` was given.

    Example:
        >>> model, args, what = build_factory_model("mypkg.models:build", (2, 128))  # doctest: +SKIP
    """
    factory = load_factory(spec)
    _check_callable_without_arguments(spec, factory)
    produced = factory()
    args: tuple[Any, ...] | None = None
    if isinstance(produced, tuple):
        if len(produced) != 2:
            raise CliError(f"--factory {spec!r} returned a tuple of {len(produced)}; expected (model, example_args)")
        model, example = produced
        args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    else:
        model = produced
    if not callable(model):
        raise CliError(
            f"--factory {spec!r} returned {type(model).__name__}; expected an nn.Module (or a callable) or a "
            "(model, example_args) pair"
        )
    if input_shape is not None:
        args = (_random_input(model, input_shape),)
    if args is None:
        raise CliError(f"--factory {spec!r} returned a model without example inputs; pass --input-shape B,L,...")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model, args, f"{type(model).__name__} from {spec}"


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"B,L,..."`` into a tuple of positive ints (the ``--input-shape`` argument).

    Args:
        text: comma-separated sizes, e.g. ``"2,128"``.

    Returns:
        The sizes as a tuple of ints, each ``>= 1``.

    Raises:
        argparse.ArgumentTypeError: empty, non-integer or non-positive entries.

    Example:
        >>> parse_shape("2,128")
        (2, 128)
    """
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 2,128") from None
    if any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be >= 1")
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so that :func:`main` returns the status."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="MoBA (Mixture of Block Attention) through torch.compile: see what a policy does to a model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    explain = commands.add_parser(
        "explain",
        help="compile a model with backend='moba', run it once on random inputs, print every attention decision",
        description="Compile a model with the moba backend, run it once on random inputs, and print the decision "
        "(moba or dense, chunk size, top-k, reason) for every scaled_dot_product_attention call.",
    )
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--hf-config",
        metavar="CONFIG",
        help="transformers config.json, model directory, or a preset: " + ", ".join(PRESETS) + " (random weights)",
    )
    source.add_argument(
        "--factory",
        metavar="MODULE:FUNCTION",
        help="function returning a model or a (model, example_args) pair; MODULE may be a dotted name or a .py path",
    )
    explain.add_argument("--policy", metavar="FILE", help="policy file (.toml or .json); default: the default policy")
    hf = explain.add_argument_group("with --hf-config")
    hf.add_argument("--seq-len", type=_positive_int, metavar="N", help="tokens per sequence (256)")
    hf.add_argument("--batch", type=_positive_int, metavar="B", help="sequences (1)")
    hf.add_argument(
        "--mask-form",
        action="store_true",
        help="pass use_cache=False and an all-ones attention_mask (transformers then uses the boolean-mask SDPA form)",
    )
    hf.add_argument("--dtype", choices=tuple(_DTYPES), help="parameter dtype (float32)")
    fac = explain.add_argument_group("with --factory")
    fac.add_argument(
        "--input-shape",
        type=parse_shape,
        metavar="B,L,...",
        help="one random input of this shape (token ids if the model has an nn.Embedding, else floats); "
        "replaces the factory's example args",
    )
    explain.add_argument("--impl", choices=IMPLS, default="auto", help="MoBA implementation (auto)")
    explain.add_argument(
        "--compiler", choices=COMPILERS, default="aot_eager", help="compiler after the rewrite (aot_eager)"
    )
    explain.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object ({model, inputs, report}: report as Report.to_dict()) instead of the table",
    )
    return parser


def _version() -> str:
    # The package's own literal (pyproject.toml's version is the same literal; a test keeps them equal): it answers
    # from a source checkout too, where no installed metadata may exist.
    from . import __version__

    return __version__


def _backend_user_error(err: BaseException) -> str | None:
    """The one-line message for a backend failure the user can fix, or None for anything else (a bug: traceback)."""
    from torch._dynamo.exc import BackendCompilerFailed

    inner = err.inner_exception if isinstance(err, BackendCompilerFailed) else err
    # An explicit impl the inputs cannot run raises RuntimeError("impl=... cannot run this call: <why>") from
    # ops.resolve_impl: in the pass (wrapped by Dynamo) or in the op at run time (not wrapped).
    if isinstance(inner, RuntimeError) and str(inner).startswith("impl="):
        message = _first_line(inner)
        if "TRITON_INTERPRET" in message:
            message += " (on a CPU, use --impl auto or --impl reference, or set TRITON_INTERPRET=1 to interpret)"
        return f"backend 'moba': {message}"
    return None


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain

    try:
        policy = load_policy(args.policy)
    except PolicyError as err:
        raise CliError(str(err)) from None
    kwargs: dict[str, Any] = {}
    if args.hf_config is not None:
        if args.input_shape is not None:
            raise CliError("--input-shape goes with --factory; with --hf-config use --seq-len and --batch")
        model, what = build_hf_model(args.hf_config, dtype=_DTYPES[args.dtype or "float32"])
        seq_len, batch = args.seq_len or 256, args.batch or 1
        inputs, kwargs = hf_example_inputs(model, seq_len=seq_len, batch=batch, mask_form=args.mask_form)
        shown = f"input_ids {list(inputs[0].shape)}"
        if args.mask_form:
            shown += ", attention_mask all ones, use_cache=False"
    else:
        hf_only = [flag for flag, value in _HF_FLAGS.items() if getattr(args, value) not in (None, False)]
        if hf_only:
            raise CliError(f"{', '.join(hf_only)}: only with --hf-config (with --factory, use --input-shape)")
        model, inputs, what = build_factory_model(args.factory, args.input_shape)
        shown = ", ".join(
            f"{arg.dtype} {list(arg.shape)}".replace("torch.", "") if isinstance(arg, torch.Tensor) else repr(arg)
            for arg in inputs
        )
    try:
        report = explain(model, *inputs, policy=policy, impl=args.impl, compiler=args.compiler, **kwargs)
    except RuntimeError as err:  # Dynamo's BackendCompilerFailed is a RuntimeError too
        message = _backend_user_error(err)
        if message is None:
            raise
        raise CliError(message) from None
    if args.json:
        print(json.dumps({"model": what, "inputs": shown, "report": report.to_dict()}, indent=2))
        return 0
    print(f"model: {what}")
    print(f"inputs: {shown}")
    print(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moba-compile`` command.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success (also for ``--help`` and ``--version``); 2 for a usage error or a user-fixable
        problem (missing file, bad ``--factory`` or one that needs arguments, policy error, transformers missing, an
        ``--impl`` the backend 'moba' cannot run on these inputs), reported as one line on stderr without a traceback.
        Errors raised by the model itself, and backend failures that are bugs, propagate with their traceback.

    Example:
        >>> main(["explain", "--hf-config", "tiny-llama", "--seq-len", "64"])  # doctest: +SKIP
        model: LlamaForCausalLM from tiny-llama (random weights, torch.float32)
        ...
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        err.parser.print_usage(sys.stderr)
        print(f"{err.parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _explain(args)
    except CliError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
