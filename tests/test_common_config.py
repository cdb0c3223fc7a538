import dataclasses

import pytest
import torch

from common.config import BaseConfig, UserError, cli, field, int_list, parse, resolve_device


@dataclasses.dataclass
class Cfg(BaseConfig):
    steps: int = field(10, "steps")
    lr: float = field(0.1, "learning rate")
    mode: str = field("a", "mode", choices=("a", "b"))
    flag: bool = field(False, "a switch")


PRESETS = {"smoke": dict(steps=2), "cpu": dict(), "gpu": dict(steps=100)}


def test_presets_then_flags():
    cfg = parse(Cfg, PRESETS, ["--preset", "smoke", "--lr", "0.5", "--flag", "true"])
    assert (cfg.preset, cfg.steps, cfg.lr, cfg.flag) == ("smoke", 2, 0.5, True)
    assert parse(Cfg, PRESETS, ["--preset", "smoke", "--steps", "7"]).steps == 7


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "unknown preset"),
    (["--steps", "-1"], "--steps must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--mode", "c"], "--mode must be one of a, b"),
    (["--nope", "1"], "unrecognized arguments"),
    (["--steps", "ten"], "invalid int value"),
])
def test_bad_values_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(Cfg, PRESETS, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            resolve_device("cuda")


def test_cli_turns_user_errors_into_one_line(capsys):
    def run(cfg):
        raise UserError("the dataset file is missing")

    with pytest.raises(SystemExit) as e:
        cli(run, Cfg, PRESETS, ["--preset", "smoke"], prog="prog")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "prog: error: the dataset file is missing"


def test_cuda_request_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        cli(lambda cfg: resolve_device(cfg.device), Cfg, PRESETS, ["--device", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA" in err[0]


def test_validate_hook_and_int_lists(capsys):
    @dataclasses.dataclass
    class Sized(BaseConfig):
        size: int = field(16, "image size")
        patch: int = field(4, "patch")

        def validate(self):
            if self.size % self.patch:
                raise UserError("--size must be divisible by --patch")

    assert parse(Sized, PRESETS, ["--size", "32"]).size == 32
    with pytest.raises(SystemExit):
        parse(Sized, PRESETS, ["--size", "18"])
    assert "divisible" in capsys.readouterr().err
    assert int_list("8,16", "--sizes") == [8, 16]
    for bad in ("8,x", "0", ""):
        with pytest.raises(UserError):
            int_list(bad, "--sizes")


def test_help_texts_may_contain_percent_signs(capsys):
    import dataclasses

    import pytest

    from common.config import BaseConfig, field, parse

    @dataclasses.dataclass
    class Cfg(BaseConfig):
        frac: float = field(0.25, "share of the data (25% by default)")

    with pytest.raises(SystemExit) as e:
        parse(Cfg, {"cpu": {}}, ["--help"])
    assert e.value.code == 0 and "25% by default" in capsys.readouterr().out


def test_constructor_applies_the_preset():
    # Config(preset=...) from a notebook means what --preset means: given fields win
    cfg = Cfg(preset="smoke", lr=0.3)
    assert (cfg.steps, cfg.lr) == (2, 0.3)
    assert Cfg(preset="smoke", steps=10).steps == 10  # an explicit value equal to the default still wins
    assert Cfg(preset="gpu").steps == 100 and Cfg().steps == 10
    assert dataclasses.replace(cfg, lr=0.5).steps == 2


def test_bounds_max_and_below(capsys):
    @dataclasses.dataclass
    class Bounded(BaseConfig):
        p: float = field(0.1, "a probability", min=0, below=1)
        k: int = field(2, "a count", max=5)

    assert parse(Bounded, PRESETS, ["--p", "0"]).p == 0
    for argv, msg in ((["--p", "1"], "--p must be < 1"), (["--k", "6"], "--k must be <= 5")):
        with pytest.raises(SystemExit):
            parse(Bounded, PRESETS, argv)
        assert msg in capsys.readouterr().err


def test_unusable_out_is_refused_before_anything_is_written(tmp_path, capsys):
    afile = tmp_path / "results.txt"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        with pytest.raises(SystemExit) as e:
            parse(Cfg, PRESETS, ["--out", str(out)])
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert afile.read_text() == "keep me"


def test_run_dir_checks_first_and_writes_json_atomically(tmp_path):
    from common.config import run_dir, save_json

    out = tmp_path / "run"
    run_dir(Cfg(out=str(out)), "x")
    before = (out / "config.json").read_text()
    with pytest.raises(UserError, match="--mode"):
        run_dir(Cfg(out=str(out), mode="z", seed=5), "x")  # refused: the old config.json stays
    assert (out / "config.json").read_text() == before
    save_json(out / "results.json", {"a": 1})
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_help_shows_choices_and_preset_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(Cfg, PRESETS, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--mode {a,b}" in text and "--preset {smoke,cpu,gpu}" in text
    assert "(default: 10; smoke: 2, gpu: 100)" in text  # the presets' values, not only the dataclass's
    assert "(default: false)" in text and "(default: outputs/<script>)" in text and "(default: )" not in text
