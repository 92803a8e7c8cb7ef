"""benchmarks/gpu_throughput.py in its CPU dry-run mode: it runs end to end and reports every figure."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name):
    """benchmarks/NAME.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_throughput():
    return load_benchmark("gpu_throughput")


@pytest.fixture(scope="module")
def dry_run(gpu_throughput, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_throughput") / "report.json"
    threads = torch.get_num_threads()
    returned = gpu_throughput.main(["--dry-run", "--json", str(out)])
    assert torch.get_num_threads() == threads  # the dry run must not leave the thread count changed
    return returned, json.loads(out.read_text())


def test_dry_run_is_the_small_cpu_setting(dry_run):
    _, report = dry_run
    assert report["dry_run"] is True
    assert report["device"].startswith("CPU")
    assert (report["model"], report["image_size"], report["timed_steps"]) == ("ResNet-18", 32, 2)


def test_report_figures_are_consistent(dry_run):
    returned, report = dry_run
    assert returned == report  # the JSON file holds what was printed
    for key in ("step_time_s", "images_per_sec_per_device", "model_only_images_per_sec",
                "loader_images_per_sec_one_core"):
        assert report[key] > 0, key
    assert report["images_per_sec_per_device"] == pytest.approx(report["batch_per_device"] / report["step_time_s"])
    assert 0.0 <= report["data_wait_share"] < 1.0
    assert report["projection_gpus"] == 8
    assert report["projected_images_per_sec"] == pytest.approx(8 * report["images_per_sec_per_device"])
    assert report["workers_per_device_needed"] >= 1
    assert report["projected_loader_cores"] == 8 * report["workers_per_device_needed"]


def test_printed_summary_names_the_figures(dry_run, capsys, gpu_throughput):
    gpu_throughput.print_report(dry_run[1])
    out = capsys.readouterr().out
    assert "images/s per device" in out and "waiting for data" in out and "8 devices" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_asking_for_cuda_without_one_is_a_clear_error(gpu_throughput, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_throughput.parse_args(["--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_hub_models_dry_run_times_both_families_through_both_loops(tmp_path):
    """benchmarks/hub_models.py --dry-run: tiny ViT and ConvNeXt, ours interleaved with the bare loop."""
    module = load_benchmark("hub_models")
    out = tmp_path / "hub_models.json"
    threads = torch.get_num_threads()
    report = module.main(["--dry-run", "--json", str(out)])
    assert torch.get_num_threads() == threads
    assert json.loads(out.read_text()) == report
    assert [r["model"] for r in report["models"]] == ["ViT-S/16 (dry run: tiny)", "ConvNeXt-T (dry run: tiny)"]
    for r in report["models"]:
        assert (r["image_size"], r["batch"], r["timed_steps"]) == (32, 4, 2)
        assert r["ours_s_per_iter"] > 0 and r["bare_s_per_iter"] > 0
        assert r["ratio"] == pytest.approx(r["bare_s_per_iter"] / r["ours_s_per_iter"])


# --- benchmarks/own_data_scale.py --quick: tiny folders, every figure from fresh child processes -------


@pytest.fixture(scope="module")
def own_data_quick(tmp_path_factory):
    module = load_benchmark("own_data_scale")
    out = tmp_path_factory.mktemp("own_data") / "report.json"
    work = tmp_path_factory.mktemp("own_data_work")
    returned = module.main(["--quick", "--json", str(out), "--work", str(work)])
    assert not any(work.iterdir())  # the generated folders and caches are deleted
    return module, returned, json.loads(out.read_text())


def test_own_data_quick_reports_every_figure(own_data_quick):
    _, returned, report = own_data_quick
    assert returned == report and report["quick"] is True
    assert sorted(report["sizes"], key=int) == ["40", "80"]
    for n, entry in report["sizes"].items():
        assert entry["folder_bytes"] > 0
        for kind in ("ours", "theirs"):
            figures = entry[kind]
            assert figures["batch_shape"] == [8, 3, 224, 224], kind
            assert 0 < figures["ready_s"] <= figures["first_batch_s"], kind
            assert figures["max_rss_mb"] > 0 and figures["cache_bytes"] > 0, kind
        # Both hold out about 15% for validation before the first batch (ours at least one image per class).
        assert entry["ours"]["images"] == int(n) - 10 * max(1, round(int(n) // 10 * 0.15))
        assert entry["theirs"]["images"] == int(n) - -(-int(n) * 15 // 100)
    assert report["index"]["files"] == 500 and report["index"]["reuse_s"] <= report["index"]["index_s"] * 5
    assert set(report["goals"]) == {"rss_growth_mb", "cache_fraction", "first_batch_ours_over_theirs", "index_s"}
    assert all(isinstance(goal["met"], bool) for goal in report["goals"].values())


def test_own_data_summary_names_the_goals(own_data_quick, capsys):
    module, _, report = own_data_quick
    module.print_report(report)
    out = capsys.readouterr().out
    assert "first batch" in out and "peak RSS MB" in out and "index of 500 files on one core" in out
    assert "goal cache_fraction" in out


def test_streaming_shards_quick_reports_both_sides_and_their_ratio(tmp_path, monkeypatch, capsys):
    """benchmarks/streaming_shards.py --quick: shards and image folder side by side in one run."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # the script points it at its own folder
    module = load_benchmark("streaming_shards")
    out = tmp_path / "report.json"
    threads = torch.get_num_threads()
    report = module.main(["--quick", "--json", str(out)])
    assert torch.get_num_threads() == threads
    assert json.loads(out.read_text()) == report
    assert (report["images"], report["shards"], report["batch_size"]) == (96, 2, 16)
    assert report["shards_images_per_sec"] > 0 and report["folder_images_per_sec"] > 0
    assert report["ratio_shards_to_folder"] == pytest.approx(
        report["shards_images_per_sec"] / report["folder_images_per_sec"], abs=1e-3)
    assert "ratio shards / folder" in capsys.readouterr().out
