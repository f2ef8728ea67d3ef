"""Plan files of awqkit batch / orchestrate: parsing, naming, scanning and up-front validation (no models run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from awqkit.platform.plan import PlanError, load_plan, plan_from_dict
from awqkit.spec import QuantMethod

RUN = "Qwen3-0.6B-openmath_SFT_NoPeft"


def _model(folder: Path, *, quantized: bool = False, weights: bool = True) -> Path:
    """A folder that looks like a Hugging Face model (the plan reads files only)."""
    folder.mkdir(parents=True)
    cfg: dict = {"architectures": ["LlamaForCausalLM"]}
    if quantized:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _model(tmp_path / "models" / RUN)
    (tmp_path / "calibration_openmath_128samples.txt").write_text("hello\n")
    (tmp_path / "wiki.txt").write_text("some text\n")
    return tmp_path


PLAN_TOML = f"""
output_dir = "runs"
[defaults]
calib = "calibration_{{dataset}}_128samples.txt"
n_samples = 16
n_grid = 5
[[models]]
path = "models/{RUN}"
[[specs]]
method = "awq"
bits = [3, 4]
group_size = 128
[[specs]]
method = "rtn"
bits = 4
group_size = 64
zero_point = false
[[specs]]
method = "fp"
[eval]
tasks = "ppl,kl"
windows = "all"
seq_len = 64
text = "wiki.txt"
"""


def test_toml_plan(root: Path) -> None:
    (root / "plan.toml").write_text(PLAN_TOML)
    plan = load_plan(root / "plan.toml")
    assert plan.output_dir == root / "runs"  # relative to the plan file, not the working directory
    (m,) = plan.models
    assert (m.base_model, m.dataset, m.method, m.peft) == ("Qwen3-0.6B", "openmath", "SFT", "NoPeft")
    assert m.calib.source == str(root / "calibration_openmath_128samples.txt") and m.calib.n_samples == 16
    assert plan.search.n_grid == 5
    assert [s.method for s in plan.specs] == [QuantMethod.AWQ, QuantMethod.AWQ, QuantMethod.RTN, QuantMethod.NONE]
    names = [c.folder.name for c in plan.cells()]  # fp is never quantized
    assert names == [
        f"{RUN}_AWQ_w3_g128_headfp16_quantized",
        f"{RUN}_AWQ_w4_g128_headfp16_quantized",
        f"{RUN}_RTN_w4_g64_sym_headfp16_quantized",
    ]
    assert all(c.folder.parent == root / "runs" for c in plan.cells())
    assert plan.eval.tasks == ("ppl", "kl") and plan.eval.windows is None and plan.eval.text == root / "wiki.txt"
    json.dumps(plan.to_dict())  # JSON-ready
    # the command line may move the outputs elsewhere
    assert load_plan(root / "plan.toml", output_dir=root / "other").output_dir == root / "other"


def test_yaml_plan_matches_toml(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "plan.toml").write_text(PLAN_TOML)
    yaml_text = f"""
output_dir: runs
defaults: {{calib: "calibration_{{dataset}}_128samples.txt", n_samples: 16, n_grid: 5}}
models:
  - path: models/{RUN}
specs:
  - {{method: awq, bits: [3, 4], group_size: 128}}
  - {{method: rtn, bits: 4, group_size: 64, zero_point: false}}
  - {{method: fp}}
eval: {{tasks: "ppl,kl", windows: all, seq_len: 64, text: wiki.txt}}
"""
    (root / "plan.yaml").write_text(yaml_text)
    a, b = load_plan(root / "plan.toml"), load_plan(root / "plan.yaml")
    assert {**a.to_dict(), "source": None} == {**b.to_dict(), "source": None}
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML missing: a clear error, TOML still works
    with pytest.raises(PlanError, match="PyYAML is not installed"):
        load_plan(root / "plan.yaml")


def test_typos_are_errors_naming_key_and_file(root: Path) -> None:
    bad = PLAN_TOML.replace("group_size = 64", "group_szie = 64").replace("n_grid = 5", "n_gird = 5")
    bad = bad.replace('output_dir = "runs"', 'output_dir = "runs"\ndevise = "cpu"')
    (root / "plan.toml").write_text(bad)
    with pytest.raises(PlanError) as err:
        load_plan(root / "plan.toml")
    msg = str(err.value)
    assert str(root / "plan.toml") in msg and "3 problems" in msg  # all reported together
    assert "specs[1].group_szie: unknown key; did you mean 'group_size'?" in msg
    assert "defaults.n_gird: unknown key; did you mean 'n_grid'?" in msg
    assert "devise: unknown key; did you mean 'device'?" in msg


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("bits = [3, 4]", "bits = [3, 9]"), "weights_bits=9 is not supported"),
        (("n_samples = 16", 'n_samples = "many"'), "defaults.n_samples: 'many' is not an integer"),
        (('tasks = "ppl,kl"', 'tasks = "ppl,kll"'), "eval.tasks: unknown task(s) ['kll']"),
        (('windows = "all"', "windows = 0"), "eval.windows: 0 is not a positive integer or 'all'"),
        (('text = "wiki.txt"', 'text = "missing.txt"'), "eval.text:"),
        (('output_dir = "runs"', ""), "output_dir: missing"),
        (('method = "fp"', 'method = "fp"\ngroup_size = 128'), "specs[2]: method none (float) has no group_size"),
        (('method = "rtn"', 'method = "hqq"'), "specs[1]: quantization method 'hqq' is not known"),
    ],
)
def test_bad_values(root: Path, edit: tuple[str, str], expected: str) -> None:
    assert edit[0] in PLAN_TOML
    (root / "plan.toml").write_text(PLAN_TOML.replace(*edit))
    with pytest.raises(PlanError) as err:
        load_plan(root / "plan.toml")
    assert expected in str(err.value)


def test_duplicate_outputs_and_calibration(root: Path) -> None:
    base = {"output_dir": "runs", "models": [{"path": f"models/{RUN}"}]}
    with pytest.raises(PlanError, match=r"specs\[1\]: gives the output tag RTN_w4_g128_headfp16 again"):
        plan_from_dict({**base, "specs": [{"method": "rtn"}, {"method": "rtn", "bits": 4}]}, base_dir=root)
    # AWQ needs the calibration file to exist; RTN does not read it
    with pytest.raises(PlanError, match=r"models\[0\]\.calib: calibration file .*nope.txt does not exist"):
        plan_from_dict({**base, "defaults": {"calib": "nope.txt"}, "specs": [{"method": "awq"}]}, base_dir=root)
    plan = plan_from_dict({**base, "defaults": {"calib": "nope.txt"}, "specs": [{"method": "rtn"}]}, base_dir=root)
    assert len(plan.cells()) == 1
    with pytest.raises(PlanError, match="bad placeholder"):
        plan_from_dict({**base, "defaults": {"calib": "c_{task}.txt"}, "specs": [{"method": "rtn"}]}, base_dir=root)
    # self-calibration needs no file
    plan = plan_from_dict({**base, "defaults": {"calib": "self"}, "specs": [{"method": "awq"}]}, base_dir=root)
    assert plan.models[0].calib.source == "self"


def test_naming_sources(tmp_path: Path) -> None:
    plain = _model(tmp_path / "plain")
    with pytest.raises(PlanError, match="cannot name .*plain: base_model, dataset, method, peft not found"):
        plan_from_dict(
            {"output_dir": "o", "models": [{"path": "plain"}], "specs": [{"method": "rtn"}]}, base_dir=tmp_path
        )
    # explicit keys name it
    plan = plan_from_dict(
        {
            "output_dir": "o",
            "models": [{"path": "plain", "base_model": "Tiny-1", "dataset": "math", "method": "DPO", "peft": "LoRA"}],
            "specs": [{"method": "rtn"}],
        },
        base_dir=tmp_path,
    )
    assert plan.models[0].run_name == "Tiny-1-math_DPO_LoRA" and plan.models[0].base_model_id is None
    # a Hub id names the run without its owner, and is the model card's base model
    entry = {"path": "plain", "base_model": "Org/Tiny-3", "dataset": "math", "method": "DPO", "peft": "LoRA"}
    plan = plan_from_dict({"output_dir": "o", "models": [entry], "specs": [{"method": "rtn"}]}, base_dir=tmp_path)
    assert (plan.models[0].run_name, plan.models[0].base_model_id) == ("Tiny-3-math_DPO_LoRA", "Org/Tiny-3")
    # training_metadata.json keys (hub id shortened), the missing part from its run_name
    (plain / "training_metadata.json").write_text(
        json.dumps({"base_model": "org/Tiny-2", "dataset": "code", "run_name": "X-y_SFT_NoPeft"})
    )
    plan = plan_from_dict(
        {"output_dir": "o", "models": [{"path": "plain"}], "specs": [{"method": "rtn"}]}, base_dir=tmp_path
    )
    assert plan.models[0].run_name == "Tiny-2-code_SFT_NoPeft"
    assert plan.models[0].base_model_id is None  # the card reads training_metadata.json itself (infer_base_model)
    with pytest.raises(PlanError, match="dataset='open-math' is not valid"):
        plan_from_dict(
            {"output_dir": "o", "models": [{"path": "plain", "dataset": "open-math"}], "specs": [{"method": "rtn"}]},
            base_dir=tmp_path,
        )


def test_scan(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _model(models / "A-1-math_SFT_NoPeft")
    _model(models / "group" / "B-2-code_DPO_LoRA")
    _model(models / "A-1-math_SFT_NoPeft_AWQ_w4_g128_quantized", quantized=True)  # an output: skipped
    _model(models / ".hidden" / "C-3-x_SFT_NoPeft")
    _model(models / "D-4-x_SFT_NoPeft", weights=False)  # config only: skipped
    _model(models / "E-5-draft_SFT_NoPeft")
    _model(models / "runs" / "F-6-x_SFT_NoPeft")  # inside output_dir: skipped
    plan = plan_from_dict(
        {
            "output_dir": "models/runs",
            "models": [
                {"scan": "models", "exclude": ["E-*"]},
                {"path": "models/A-1-math_SFT_NoPeft"},
            ],  # found twice: used once
            "specs": [{"method": "rtn"}],
        },
        base_dir=tmp_path,
    )
    assert sorted(m.run_name for m in plan.models) == ["A-1-math_SFT_NoPeft", "B-2-code_DPO_LoRA"]
    with pytest.raises(PlanError, match=r"models\[0\]: \['dataset'\] cannot be set for a scan"):
        plan_from_dict(
            {"output_dir": "o", "models": [{"scan": "models", "dataset": "x"}], "specs": [{"method": "rtn"}]},
            base_dir=tmp_path,
        )
    with pytest.raises(PlanError, match="is already quantized"):
        plan_from_dict(
            {
                "output_dir": "o",
                "models": [{"path": "models/A-1-math_SFT_NoPeft_AWQ_w4_g128_quantized"}],
                "specs": [{"method": "rtn"}],
            },
            base_dir=tmp_path,
        )
    with pytest.raises(PlanError, match="exactly one of 'path'"):
        plan_from_dict(
            {"output_dir": "o", "models": [{"path": "a", "scan": "b"}], "specs": [{"method": "rtn"}]}, base_dir=tmp_path
        )


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "none.toml")
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(PlanError, match=r"must end in \.toml, \.yaml or \.yml"):
        load_plan(tmp_path / "plan.json")
    (tmp_path / "plan.toml").write_text("output_dir = \n")
    with pytest.raises(PlanError, match="is not valid TOML"):
        load_plan(tmp_path / "plan.toml")
    (tmp_path / "plan.yml").write_text("- a\n- b\n")
    with pytest.raises(PlanError, match="must hold a table"):
        load_plan(tmp_path / "plan.yml")
    (tmp_path / "empty.toml").write_text("")
    with pytest.raises(PlanError, match="3 problems") as err:
        load_plan(tmp_path / "empty.toml")
    assert "output_dir: missing" in str(err.value) and "models: must be" in str(err.value)
