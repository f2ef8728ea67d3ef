"""The platform's vocabulary: quantization specs and methods, run names, calibration sets built from
training data, and folder descriptions (``awqkit calib build``, ``awqkit info``).

* :mod:`awqkit.platform.spec`: :class:`QuantMethod`, :class:`QuantizationSpec`, :func:`resolve_quantization_spec`;
* :mod:`awqkit.platform.naming`: :func:`make_run_name`, :func:`parse_run_name`, :func:`quant_tag`;
* :mod:`awqkit.platform.calib_build`: :func:`build_calibration_set` and the calibration file format;
* :mod:`awqkit.platform.info`: :func:`describe_folder`, :func:`training_link`.

Every module here imports only the standard library and awqkit's config at import time.
"""

from __future__ import annotations

from awqkit.platform.calib_build import (
    CalibrationSet,
    MissingDependencyError,
    build_calibration_set,
    calibration_sample_size,
    read_calibration_file,
    write_calibration_file,
)
from awqkit.platform.info import FolderInfo, describe_folder, format_info, training_link
from awqkit.platform.naming import (
    ParsedRunName,
    RunNameError,
    make_run_name,
    parse_quant_tag,
    parse_run_name,
    quant_tag,
    quantized_folder_name,
)
from awqkit.platform.spec import (
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
