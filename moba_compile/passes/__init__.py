"""FX passes over Dynamo graphs: find SDPA sites, classify them, rewrite the chosen ones into ``moba::attention``."""

from .rewrite import rewrite_sdpa
from .sites import SdpaSite, find_sdpa_sites, layer_from_path, module_path

__all__ = ["SdpaSite", "find_sdpa_sites", "layer_from_path", "module_path", "rewrite_sdpa"]
