"""Settings from YAML and the command line are type-checked by the dataclass annotations."""

from __future__ import annotations

import pytest

from sasa.cli import main
from sasa.errors import SasaError
from sasa.trainer.config import MemberConfig, load_sweep
from sasa.trainer.sae_config import SAEConfig


def sweep(tmp_path, body: str):
    path = tmp_path / "sweep.yaml"
    path.write_text("cache: /nowhere\n" + body)
    return path


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; the sweep must still mean 1e-4.
    cfg = load_sweep(sweep(tmp_path, "tokens: 1.0e+6\nsaes:\n"
                                     "  - {hookpoint: h, groups: 8, nuc_lambda: 1e-4, lr: 3e-4}\n"))
    m = cfg.members[0]
    assert m.sae["nuc_lambda"] == 1e-4 and type(m.sae["nuc_lambda"]) is float
    assert m.lr == 3e-4 and cfg.tokens == 1_000_000 and type(cfg.tokens) is int
    assert m.name == "sasa-h-G8-r4-s8-nuc0.0001"  # defaults resolved by SAEConfig, not restated


@pytest.mark.parametrize("body, message", [
    ("saes:\n  - {hookpoint: h, groups: 8, rank: two}\n",
     r"sweep.yaml: SAE entry 0: rank must be an integer or null, got 'two'$"),
    ('batch_size: "64"\nsaes:\n  - {hookpoint: h, groups: 8}\n',
     r"sweep.yaml: batch_size must be an integer, got '64'$"),
    ("saes:\n  - {hookpoint: h, groups: 8}\n  - {hookpoint: h, groups: 8, top_s: 2.5}\n",
     r"SAE entry 1: top_s must be an integer, got 2.5$"),
    ("saes:\n  - {hookpoint: h, groups: 8, gate: 1}\n", r"gate must be a string, got 1$"),
    ("autocast: yes please\nsaes:\n  - {hookpoint: h, groups: 8}\n",
     r"autocast must be true or false, got 'yes please'$"),
    ("exclude: bos\nsaes:\n  - {hookpoint: h, groups: 8}\n",
     r"exclude must be a list of strings, got 'bos'$"),
    ("saes:\n  - {hookpoint: h, groups: 8, lr: fast}\n", r"lr must be a number or null, got 'fast'$"),
])
def test_wrong_types_name_the_field_and_the_type(tmp_path, body, message):
    with pytest.raises(SasaError, match=message):
        load_sweep(sweep(tmp_path, body))


def test_python_api_checks_too():
    with pytest.raises(SasaError, match="groups must be an integer, got '8'"):
        SAEConfig(d_in=16, groups="8")
    with pytest.raises(SasaError, match="nuc_lambda must be a number, got None"):
        SAEConfig(d_in=16, groups=8, nuc_lambda=None)
    assert SAEConfig(d_in=16, groups=8, nuc_lambda="2e-3").nuc_lambda == 2e-3
    with pytest.raises(SasaError, match="unknown gather_into 'donor'; use one of host, silent$"):
        SAEConfig(d_in=16, groups=8, gather_into="donor")
    with pytest.raises(SasaError, match="rank must be >= 1"):  # values, not only types, checked early
        MemberConfig("h", {"groups": 8, "rank": 0})


def test_cli_prints_one_line(tmp_path, capsys):
    path = sweep(tmp_path, "saes:\n  - {hookpoint: h, groups: 8, rank: two}\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith("SAE entry 0: rank must be an integer or null, got 'two'") and "\n" not in err
    assert not (tmp_path / "out").exists()
