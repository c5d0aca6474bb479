"""Experiments from spec files: one schema (:mod:`.spec`), one runner (:mod:`.runner`, behind
``glrnet reproduce``), and the analyses it applies to a spec's runs — the paper's transfer tables
(:mod:`.transfer`), certified radii (:mod:`.certified`), the adaptive-attack protocol
(:mod:`.protocol`) and the technique study's gradient quality and time to accuracy (:mod:`.study`)."""

from .runner import export_results, reproduce, resolve_spec
from .runs import data_folder, dataset_options, initial_model
from .schema import Spec, find_spec, packaged_specs, spec_path
from .spec import load_spec
from .study import gradient_quality, quality_config, quality_key

__all__ = ["Spec", "data_folder", "dataset_options", "export_results", "find_spec", "gradient_quality",
           "initial_model", "load_spec", "packaged_specs", "quality_config", "quality_key", "reproduce", "resolve_spec", "spec_path"]
