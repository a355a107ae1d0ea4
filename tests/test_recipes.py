"""The recipes shipped in the package: reachable as configs/ in a clone, by name from the
command line (--method, normbench sweep NAME), listed by `normbench list`, inside the wheel."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from normbench.cli import app
from normbench.config import load_config, load_config_dict
from normbench.errors import UserError
from normbench.recipe_files import (BASE_RECIPE, METHODS, RECIPES, SWEEPS, first_comment, grid_size, method_names,
                                    method_recipe, sweep_file, sweep_names)

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def recipe_files() -> list[Path]:
    return sorted(RECIPES.rglob("*.yaml"))


def test_the_clone_reaches_the_recipes_as_configs():
    assert (REPO / "configs").resolve() == RECIPES
    assert (REPO / "configs" / "methods" / "none.yaml").read_text() == (METHODS / "none.yaml").read_text()
    assert {p.stem for p in (REPO / "configs" / "sweeps").glob("*.yaml")} == set(sweep_names())


def test_recipes_include_the_base_methods_sweeps_and_studies():
    assert BASE_RECIPE.is_file() and (RECIPES / "quickstart.yaml").is_file()
    assert {"bn", "gn", "none", "nf"} <= set(method_names())
    assert {"quick", "small_batch", "converged"} <= set(sweep_names())
    assert (RECIPES / "studies" / "converged.yaml").is_file()


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_base_chain_resolves(path):
    raw = load_config_dict(path) if "sweeps" not in path.parts else yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw
    if "sweeps" in path.parts:  # a sweep's base: relative to the sweep file
        assert load_config_dict(path.parent / raw["base"])["model"]["arch"] == "resnet20"


def test_method_recipe_by_name_and_an_unknown_name():
    assert method_recipe("gn") == METHODS / "gn.yaml"
    with pytest.raises(UserError, match=r"--method: unknown method 'gnn' \(did you mean 'gn'\?\); known: bn, "):
        method_recipe("gnn")


def test_sweep_file_prefers_an_existing_path_then_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep_file("quick") == SWEEPS / "quick.yaml"
    assert sweep_file("quick.yaml") == SWEEPS / "quick.yaml"
    (tmp_path / "quick").write_text("grid: {seed: [0]}\n")
    assert sweep_file("quick") == Path("quick")  # a file of that name wins
    with pytest.raises(UserError, match=r"sweep file not found: quik \(did you mean 'quick'\?\); give a path or "
                                        r"the name of an example sweep: brn_momentum_check, converged"):
        sweep_file("quik")
    with pytest.raises(UserError, match="sweep file not found: configs/sweeps/nope.yaml"):
        sweep_file("configs/sweeps/nope.yaml")


def test_a_directory_never_shadows_an_example_sweep_and_is_not_a_sweep_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").mkdir()
    (tmp_path / "results").mkdir()
    assert sweep_file("quick") == SWEEPS / "quick.yaml"  # the folder of that name is no sweep file
    with pytest.raises(UserError, match=r"^sweep path results is a directory, not a sweep file; give a sweep's "
                                        r"YAML file or the name of an example sweep: brn_momentum_check"):
        sweep_file("results")
    result = runner.invoke(app, ["sweep", str(tmp_path), "--dry-run"])
    out = result.output.strip()
    assert result.exit_code == 2 and len(out.splitlines()) == 1, out
    assert f"sweep path {tmp_path} is a directory, not a sweep file" in out and "Traceback" not in out, out


def test_a_packaged_sweep_writes_under_the_current_folder(tmp_path, monkeypatch):
    from normbench.sweep import load_sweep

    monkeypatch.chdir(tmp_path)
    spec = load_sweep(sweep_file("quick"), preflight=False)
    assert spec.out_dir == tmp_path / "runs" / "sweeps" / "quick"
    assert all(c.run_dir.is_relative_to(tmp_path) and not c.run_dir.is_relative_to(RECIPES) for c in spec.cells)
    assert len(spec.cells) == grid_size(yaml.safe_load((SWEEPS / "quick.yaml").read_text())["grid"]) == 6


def test_grid_size_and_first_comment(tmp_path):
    assert grid_size({"a": [1, 2], "b,c": [[1, 2], [3, 4], [5, 6]]}) == 6
    assert grid_size({"a": 3}) is None and grid_size(None) is None
    path = tmp_path / "r.yaml"
    path.write_text("# WS (Qiao et al. 2019) in every conv, e.g. GN. Second sentence.\n# more\n\nseed: 0\n")
    assert first_comment(path) == "WS (Qiao et al. 2019) in every conv, e.g. GN."


def test_method_none_trains_agc_at_the_recipe_lambda(tmp_path):
    result = runner.invoke(app, ["train", "--method", "none", "--print-config"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["norm"]["kind"] == "none" and cfg["clip"]["mode"] == "agc" and cfg["clip"]["agc_lambda"] == 0.16
    assert cfg["train"]["epochs"] == 30  # the base recipe under it


def test_method_comes_first_then_config_files_then_set(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("norm: {groups: 4}\ntrain: {batch_size: 16, epochs: 2}\n")
    result = runner.invoke(app, ["train", "--method", "gn", "-c", str(extra), "--set", "train.batch_size=8",
                                 "--print-config"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert (cfg["norm"]["kind"], cfg["norm"]["groups"], cfg["train"]["batch_size"], cfg["train"]["epochs"]) == \
        ("gn", 4, 8, 2)
    expected = load_config([METHODS / "gn.yaml", extra], ["train.batch_size=8"])
    assert cfg == expected.to_dict()
    bn_file = tmp_path / "bn.yaml"
    bn_file.write_text("norm: {kind: bn}\n")
    result = runner.invoke(app, ["train", "--method", "gn", "-c", str(bn_file), "--print-config"])
    assert yaml.safe_load(result.output)["norm"]["kind"] == "bn"  # a --config file overrides the recipe


def test_an_unknown_method_is_one_line_listing_the_choices():
    result = runner.invoke(app, ["train", "--method", "gm"])
    out = result.output.strip()
    assert result.exit_code == 2 and len(out.splitlines()) == 1, out
    assert "Invalid value for '--method'" in out and "'gn'" in out and "'none'" in out, out
    assert "Value error" not in out


def test_train_help_lists_the_methods():
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    assert "|".join(method_names()) in out, out


def test_a_bad_value_from_a_method_recipe_names_the_method(tmp_path):
    result = runner.invoke(app, ["train", "--method", "gn", "--set", "norm.groups=0", "--print-config"])
    assert result.exit_code == 2 and "--method gn: norm.groups: got 0" in result.output, result.output


def test_sweep_by_name_dry_run_writes_nothing_and_names_the_cwd_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sweep", "quick", "--dry-run", "--no-estimate", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "sweep quick.yaml: 6 cells" in result.output and "6 new" in result.output, result.output
    assert str(tmp_path / "runs") in result.output.replace("\n", "")
    assert not any(RECIPES.rglob("sweep.json")) and not (RECIPES / "runs").exists()


def test_an_unknown_sweep_name_is_one_line_listing_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sweep", "quik", "--dry-run"])
    out = result.output.strip()
    assert result.exit_code == 2 and len(out.splitlines()) == 1, out
    assert "sweep file not found: quik (did you mean 'quick'?)" in out and "small_batch_pilot" in out, out


def test_list_plain_names_every_scheme_mode_method_and_sweep():
    from normbench.config import CLIP_MODES
    from normbench.norms import available_norms

    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    firsts = {line.split("  ")[0].strip() for line in lines if line.strip()}
    for name in [*available_norms(), *CLIP_MODES, *method_names(), *sweep_names()]:
        assert name in firsts, name
    assert "┃" not in result.output  # plain in a pipe
    none_row = next(line for line in lines if line.startswith("none ") and "AGC" in line)
    assert "no norm + AGC (λ 0.16)" in none_row
    quick_row = next(line for line in lines if line.startswith("quick "))
    assert quick_row.split()[1] == "6"


def test_list_json_matches_the_registry_and_the_recipes():
    from normbench.cli.listing import CLIP_RULES, SCHEME_SETTINGS
    from normbench.config import CLIP_MODES, ClipConfig, NormConfig
    from normbench.norms import available_norms

    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [s["key"] for s in data["schemes"]] == available_norms()
    assert set(SCHEME_SETTINGS) == set(available_norms())
    assert all(k in NormConfig.model_fields for keys in SCHEME_SETTINGS.values() for k in keys)
    assert set(CLIP_RULES) == set(CLIP_MODES)
    assert all(k in ClipConfig.model_fields for _, keys in CLIP_RULES.values() for k in keys)
    schemes = {s["key"]: s for s in data["schemes"]}
    assert schemes["gn"]["defaults"] == {"eps": 1e-5, "groups": 8} and schemes["gn"]["name"] == "GN"
    assert schemes["frn"]["defaults"]["eps"] == 1e-6 and schemes["bn"]["paper"] == "Ioffe & Szegedy 2015"
    assert [m["name"] for m in data["methods"]] == method_names()
    sweeps = {s["name"]: s for s in data["sweeps"]}
    assert set(sweeps) == set(sweep_names()) and sweeps["small_batch"]["cells"] == 132
    assert sweeps["quick"]["description"].startswith("quick look")
    assert {m["mode"]: m for m in data["clip_modes"]}["agc"]["defaults"] == {"agc_lambda": 0.01, "agc_eps": 1e-3}


def test_list_json_names_every_clip_mode_of_the_schema_and_every_scheme_even_undescribed(monkeypatch):
    import typing

    from normbench.cli import listing
    from normbench.config import ClipConfig
    from normbench.norms import available_norms

    schema_modes = typing.get_args(ClipConfig.model_fields["mode"].annotation)
    assert "agc" in schema_modes and "dynamic" in schema_modes
    monkeypatch.delitem(listing.CLIP_RULES, "agc")  # as for a mode added to the schema but not to the table
    monkeypatch.delitem(listing.SCHEME_SETTINGS, "gn")
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    modes = {m["mode"]: m for m in data["clip_modes"]}
    assert list(modes) == list(schema_modes)
    assert modes["agc"] == {"mode": "agc", "clips": listing.UNDESCRIBED_CLIP,
                            "defaults": {"agc_lambda": 0.01, "agc_eps": 1e-3}}
    assert modes["dynamic"]["defaults"] == {"alpha": 1.5, "beta": 0.0, "window": 50}
    assert [s["key"] for s in data["schemes"]] == available_norms()
    assert {s["key"]: s for s in data["schemes"]}["gn"]["defaults"] == {"eps": 1e-5}
    plain = runner.invoke(app, ["list"])
    assert plain.exit_code == 0 and any(line.startswith("agc ") for line in plain.output.splitlines()), plain.output


def test_list_on_a_terminal_is_a_rich_table(capsys):
    from normbench.cli.listing import print_rich, tables

    print_rich(tables())
    out = capsys.readouterr().out
    assert "normalization schemes (norm.kind)" in out and "example sweeps" in out and "━" in out


def _build_wheel(where: Path) -> Path:
    """A wheel of this tree, built from a copy of its sources (so no build/ appears in the clone)."""
    src = where / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "normbench", src / "normbench", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(where / "wheel"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (where / "wheel").glob("normbench-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_holds_the_recipes_and_trains_them_outside_the_clone(tmp_path):
    import normbench

    wheel = _build_wheel(tmp_path)
    assert wheel.name.startswith(f"normbench-{normbench.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in recipe_files():
        assert f"normbench/{path.relative_to(RECIPES.parent).as_posix()}" in names, path
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    code = ("import normbench, sys; sys.argv = ['normbench'] + sys.argv[1:]; "
            f"assert normbench.__file__.startswith({str(target)!r}), normbench.__file__; "
            "from normbench.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code, "train", "--method", "none", "--print-config"],
                         capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    cfg = yaml.safe_load(run.stdout)
    assert cfg["clip"] == {**cfg["clip"], "mode": "agc", "agc_lambda": 0.16}
    listed = subprocess.run([sys.executable, "-c", code, "list", "--json"], capture_output=True, text=True,
                            cwd=elsewhere, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert {s["name"] for s in json.loads(listed.stdout)["sweeps"]} == set(sweep_names())
