"""Small-scale reproduction of the MoBA paper's charts (Lu et al., Moonshot AI, 2025) with moba-compile.

Small GPT-style byte-level causal LMs are trained from scratch on the bytes of the Python standard library's source
files (at the large scale, also those of the installed packages), with MoBA (through ``torch.compile(model,
backend="moba", options={"policy": ...})``) and with full attention, and the paper's four charts are redrawn from the
runs' JSON logs: (a) scaling of the LM loss with training compute, (b) the trailing-token loss at long context, (c)
block granularity at 75% sparsity, (d) hybrid MoBA/full recipes; and (e) a trained full-attention model converted to
MoBA, as is and after a short continued training (mid, large and smoke scales).

Run from the repository root::

    python -m examples.reproduce --smoke                 # the whole pipeline at tiny scale, CPU, under a minute
    python -m examples.reproduce list                    # the experiments, their runs and planned compute
    python -m examples.reproduce sweep scaling --resume  # one experiment's runs, in sequence (GPU)
    python -m examples.reproduce plot                    # charts (PNG) and a markdown table from the JSON logs
    python -m examples.reproduce list --mid              # runs that fit one GPU call, grouped into calls
    python -m examples.reproduce list --large            # the next scale: its corpus, runs, calls and commands
    python -m examples.reproduce calibrate DIR           # fit the time estimate to the logs of a results tree

See ``docs/reproduction.md``.
"""
