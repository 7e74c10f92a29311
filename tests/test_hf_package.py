"""The moba_compile.hf package: importing it (or the command line) does not import transformers; MobaCache is a real
class once asked for; the model library lives in moba_compile.hf.models."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers", reason="the 'test' extra installs transformers")


def test_importing_the_package_and_the_cli_does_not_import_transformers():
    code = (
        "import sys, moba_compile, moba_compile.hf, moba_compile.hf.models, moba_compile.cli\n"
        "assert 'transformers' not in sys.modules, 'imported transformers'\n"
        "assert 'MobaCache' in dir(moba_compile.hf)\n"
        "assert 'transformers' not in sys.modules, 'dir() imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_moba_cache_is_a_dynamic_cache_class():
    import moba_compile.hf
    from moba_compile.hf import MobaCache
    from moba_compile.hf.cache import MobaCache as from_module

    assert isinstance(MobaCache, type) and MobaCache is from_module is moba_compile.hf.MobaCache
    assert issubclass(MobaCache, transformers.DynamicCache) and MobaCache.__doc__
    cache = MobaCache()
    assert isinstance(cache, MobaCache) and isinstance(cache, transformers.DynamicCache)
    assert type(pickle.loads(pickle.dumps(cache))) is MobaCache  # found again by its module and name


def test_model_library_moved_to_hf_models_and_the_cli_still_reads_it():
    import moba_compile.cli as cli
    from moba_compile.hf import models

    assert models.PRESETS is cli.PRESETS and models.CliError is cli.CliError
    assert models.load_hf_config("tiny-llama").num_hidden_layers == 4
    with pytest.raises(models.CliError, match="no such file"):
        models.load_hf_config("no/such/config.json")
