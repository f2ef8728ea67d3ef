"""QuantConfig refuses what awqkit would otherwise ignore."""

from __future__ import annotations

import pytest
from errors_catalogue import assert_error

from awqkit.config import QuantConfig
from awqkit.errors import InputError


def test_keep_lm_head_fp16_false_is_refused_not_ignored() -> None:
    assert QuantConfig().keep_lm_head_fp16 is True
    with pytest.raises(InputError) as exc:
        QuantConfig(keep_lm_head_fp16=False)
    assert_error("SET-LM-HEAD", str(exc.value))
