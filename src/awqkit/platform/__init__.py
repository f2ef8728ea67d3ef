"""The platform: run names, calibration sets built from training data, plans, batch quantization and
orchestration (``awqkit calib build``, ``awqkit batch``, ``awqkit orchestrate``), on top of :mod:`awqkit.api`.

Re-exported here for the platform's scripts: the spec vocabulary (:mod:`awqkit.spec`: :class:`QuantMethod`,
:class:`QuantizationSpec`, :func:`resolve_quantization_spec`), run names (:mod:`awqkit.naming`),
calibration sets (:mod:`awqkit.platform.calib_build`) and folder descriptions (:mod:`awqkit.platform.info`).
"""

from __future__ import annotations

from awqkit.naming import (
    ParsedRunName,
    RunNameError,
    make_run_name,
    parse_quant_tag,
    parse_run_name,
    quant_tag,
    quantized_folder_name,
)
from awqkit.platform.calib_build import (
    CalibrationSet,
    MissingDependencyError,
    build_calibration_set,
    calibration_sample_size,
    read_calibration_file,
    write_calibration_file,
)
from awqkit.platform.info import FolderInfo, describe_folder, format_info, training_link
from awqkit.spec import (
    QuantizationSpec,
    QuantMethod,
    resolve_quantization_spec,
    spec_from_metadata,
    spec_metadata,
    warn_unapplied,
)

__all__ = [
    "CalibrationSet",
    "FolderInfo",
    "MissingDependencyError",
    "ParsedRunName",
    "QuantMethod",
    "QuantizationSpec",
    "RunNameError",
    "build_calibration_set",
    "calibration_sample_size",
    "describe_folder",
    "format_info",
    "make_run_name",
    "parse_quant_tag",
    "parse_run_name",
    "quant_tag",
    "quantized_folder_name",
    "read_calibration_file",
    "resolve_quantization_spec",
    "spec_from_metadata",
    "spec_metadata",
    "training_link",
    "warn_unapplied",
    "write_calibration_file",
]
