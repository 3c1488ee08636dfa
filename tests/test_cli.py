"""The command line: JSON output, exit codes, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpcap.cli import main
from dpcap.privacy.accountant import calibrate_sigma, epsilon
from tests.conftest import train_overrides, write_caption_folder

DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml")


def run_json(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_privacy_epsilon_and_sigma(capsys):
    args = ["--sample-rate", "0.02", "--steps", "500", "--delta", "1e-5"]
    eps = run_json(capsys, ["privacy", "epsilon", "--sigma", "1.1", *args, "--accountant", "rdp"])
    assert eps["epsilon"] == pytest.approx(epsilon(1.1, 0.02, 500, 1e-5, accountant="rdp"))
    assert eps["epsilon"] == pytest.approx(2.576, abs=2e-3)  # dp-accounting's RDP value (NOTES.md)
    sigma = run_json(capsys, ["privacy", "sigma", "--epsilon", "3", *args])
    assert sigma["sigma"] == pytest.approx(calibrate_sigma(3.0, 0.02, 500, 1e-5), rel=1e-6)


def test_plan_reproduces_dpcap(capsys):
    argv = ["plan", "--num-samples", "233804767", "--batch-size", "1310720", "--steps", "5708", "--epsilon", "8"]
    result = run_json(capsys, [*argv, "--accountant", "rdp", "--gpus", "128", "--per-gpu-batch", "128"])
    assert result["sigma"] == pytest.approx(0.728, rel=0.01)
    assert result["accumulation_steps"] == 80
    assert result["epochs"] == pytest.approx(32.0, rel=0.01)


def test_data_build_and_stats(capsys, tmp_path):
    manifest = write_caption_folder(tmp_path / "src", count=10)
    (tmp_path / "src" / "images" / "0003.png").write_bytes(b"not an image")
    built = run_json(capsys, ["data", "build", str(manifest), "--out", str(tmp_path / "shards")])
    assert built["written"] == 9 and built["skipped"] == {"corrupt_image": 1}
    assert run_json(capsys, ["data", "stats", str(tmp_path / "shards")])["samples"] == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "data.shards=/nonexistent", "privacy.sigma=1"], "nonexistent"),
        (["train", "data.shards=x", "privacy.sigma=1", "train.nonsense=3"], "train.nonsense"),
        (["train", "data.shards=x", "privacy.sigma=1", "train.steps=many"], "train.steps"),
        (["train", "data.shards=x"], "privacy.sigma"),
        (
            ["privacy", "epsilon", "--sigma", "1", "--sample-rate", "2", "--steps", "3", "--delta", "1e-5"],
            "sample_rate",
        ),
        (["data", "stats", "/nonexistent"], "sizes.json"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_data_build_into_existing_shards_names_the_overwrite_flag(capsys, tmp_path):
    manifest = write_caption_folder(tmp_path / "src", count=4)
    argv = ["data", "build", str(manifest), "--out", str(tmp_path / "shards")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "already holds shards" in line and "--overwrite" in line and "overwrite=True" not in line
    assert run_json(capsys, [*argv, "--overwrite"])["written"] == 4


def one_error_line(capsys) -> str:
    """The single `error: …` line a user error prints on stderr (no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_failed_train_start_leaves_no_run_folder(capsys, tmp_path):
    run = tmp_path / "runs" / "run"
    assert main(["train", DEMO_CONFIG, "data.shards=/nonexistent", f"run_dir={run}"]) == 2
    assert "/nonexistent" in one_error_line(capsys)
    assert not run.exists() and not run.parent.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"train.batch_size": 1000}, "exceeds the data set size"),  # plan_privacy, after the data checks
        (
            {"data.public_shards": "/nonexistent", "train.public_batch_size": 4, "train.public_weight": 0.5},
            "/nonexistent/sizes.json",
        ),
    ],
)
def test_failed_train_start_after_the_data_checks_leaves_no_run_folder(capsys, tiny_shards, tmp_path, extra, message):
    run = tmp_path / "run"
    assert main(["train", *train_overrides(tiny_shards, run, **extra)]) == 2
    assert message in one_error_line(capsys)
    assert not run.exists()


@pytest.mark.parametrize(
    "shards, form",
    [
        ("shards/00000.tar", "a tar file"),
        ("shards/{00000..00009}.tar", "a brace pattern"),
        ("http://example.com/shards/{00000..00009}.tar", "a URL"),
        ("https://example.com/shards", "a URL"),
        ("s3://bucket/shards", "a URL"),
        ("pipe:curl -s https://example.com/00000.tar", "a pipe: command"),
    ],
)
def test_webdataset_style_shards_exit_2_saying_what_is_accepted(capsys, tmp_path, shards, form):
    run = tmp_path / "run"
    assert main(["train", DEMO_CONFIG, f"data.shards={shards}", f"run_dir={run}"]) == 2
    line = one_error_line(capsys)
    assert shards in line and form in line and "a folder written by `dpcap data build` (sizes.json" in line
    assert not run.exists()


def test_an_existing_shard_tar_is_not_a_shard_folder(capsys, tiny_shards, tmp_path):
    tar = tiny_shards / "shard-000000.tar"
    assert main(["train", *train_overrides(tiny_shards, tmp_path / "run", **{"data.shards": tar})]) == 2
    line = one_error_line(capsys)
    assert "a tar file" in line and "a folder written by `dpcap data build`" in line


def test_config_file_errors_name_the_file(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  stpes: 3\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.stpes" in err


def test_module_entry_point_trains_and_prints_json(tiny_shards, tmp_path):
    argv = [
        sys.executable,
        "-m",
        "dpcap",
        "train",
        *train_overrides(tiny_shards, tmp_path / "run", **{"train.steps": 1}),
        "--json",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["step"] == 1 and result["sampling"] == "poisson"


@pytest.fixture(scope="module")
def tiny_run(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *train_overrides(tiny_shards, run, **{"train.steps": 2, "train.ema_decay": 0.5})]) == 0
    return run


def test_export_then_stock_timm_loads_it(capsys, tiny_run, tmp_path):
    timm = pytest.importorskip("timm")
    result = run_json(capsys, ["export", str(tiny_run), "--out", str(tmp_path / "export")])
    assert result["steps"] == 2 and result["private"] is False  # insecure seeds in the fixture
    encoder = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert sum(p.numel() for p in encoder.parameters()) > 0
    assert "NOT PRIVATE" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
    # The card says which weights and which recipe: last weights here, EMA with --ema.
    assert result["weights"] == "last" and result["ema_decay"] == 0.5 and result["augmentation_multiplicity"] == 1
    assert result["init_from"] is None and result["public_data"] is None


def test_export_ema_weights(capsys, tiny_run, tmp_path):
    from safetensors.torch import load_file

    from dpcap.export import read_privacy_card
    from dpcap.pipeline import load_run

    result = run_json(capsys, ["export", str(tiny_run), "--out", str(tmp_path / "ema"), "--ema"])
    assert result["weights"] == "ema"
    card = read_privacy_card(tmp_path / "ema")
    assert card["weights"] == "ema" and card["ema_decay"] == "0.5"
    assert "moving average" in (tmp_path / "ema" / "MODEL_CARD.md").read_text()
    exported = load_file(tmp_path / "ema" / "model.safetensors")
    ema_encoder = load_run(tiny_run, ema=True)[0].encoder.state_dict()
    last_encoder = load_run(tiny_run)[0].encoder.state_dict()
    key = "patch_embed.proj.weight"
    assert torch.equal(exported[key], ema_encoder[key]) and not torch.equal(exported[key], last_encoder[key])


def test_probe_fewshot_zeroshot_commands(capsys, tiny_run, tiny_shards, tmp_path):
    data = ["--train", str(tiny_shards), "--test", str(tiny_shards), "--label", "colour"]
    probe = run_json(capsys, ["probe", str(tiny_run), *data, "--out", str(tmp_path / "probe.json")])
    assert 0 <= probe["top1"] <= 1 and probe["num_classes"] == 4
    assert (tmp_path / "probe.json").is_file() and (tmp_path / "probe.png").stat().st_size > 0
    few = run_json(capsys, ["fewshot", "random:nano", *data, "--shots", "1", "2", "--seeds", "0", "1"])
    assert set(few["shots"]) == {"1", "2"} and 0 <= few["shots"]["2"]["mean"] <= 1
    zero = run_json(
        capsys,
        ["zeroshot", str(tiny_run), "--data", str(tiny_shards), "--label", "colour", "--template", "a {} square"],
    )
    assert 0 <= zero["top1"] <= 1
    ema = run_json(capsys, ["probe", str(tiny_run), *data, "--ema"])
    assert ema["num_classes"] == 4 and 0 <= ema["top1"] <= 1
    assert main(["probe", "random:nano", *data, "--ema"]) == 2  # a random init has no EMA
    assert "no EMA" in capsys.readouterr().err


def test_probe_on_imagefolder_tree(capsys, tiny_run, tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 6):
            folder = tmp_path / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), tuple(max(0, c - 5 * i) for c in colour)).save(folder / f"{i}.png")
    probe = run_json(
        capsys, ["probe", str(tiny_run), "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test")]
    )
    assert probe["num_classes"] == 2 and probe["num_test"] == 12
    assert probe["top1"] == 1.0  # two flat colours are linearly separable in any non-degenerate features


def test_export_into_a_full_folder_needs_the_overwrite_flag(capsys, tiny_run, tmp_path):
    out = tmp_path / "export"
    run_json(capsys, ["export", str(tiny_run), "--out", str(out)])
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--overwrite" in err and "overwrite=True" not in err
    result = run_json(capsys, ["export", str(tiny_run), "--out", str(out), "--overwrite"])
    assert Path(result["out"]) == out and (out / "model.safetensors").is_file()
