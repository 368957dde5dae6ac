import subprocess
import sys

import pytest

from bamboo.cli import main
from bamboo.models import BambooConfig, BambooForCausalLM


def test_demo_prints_sparsity_sites_and_exact_compile(capsys):
    assert main(["demo", "--new-tokens", "4", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "FFN activation sparsity per layer" in out and "model.layers.3.mlp" in out
    assert "drelu" in out and "FFN weight bytes not read" in out
    diff = float(out.split("largest relative difference from dense: ")[1].split()[0])
    assert diff < 1e-5
    assert "austen-small" in out and "did not read while generating" in out
    skipped = float(out.split("did not read while generating: ")[1].split("%")[0])
    # A trained dReLU model leaves most up and down rows unread (measured: 47% of all FFN bytes with 4 new tokens,
    # where the prompt's union dominates; 54% with 16). The gate, a third of the bytes, is always read.
    assert skipped > 35


def test_inspect_builtin_config_and_checkpoint_dir(capsys, tmp_path):
    assert main(["inspect", "bamboo-7b"]) == 0
    out = capsys.readouterr().out
    assert "32 FFN site(s)" in out and "14336" in out and "bfloat16" in out
    BambooForCausalLM.from_config(BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=64)).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "2 FFN site(s)" in capsys.readouterr().out


def test_errors_are_one_line_not_a_traceback(capsys):
    assert main(["inspect", "bamboo-70b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bamboo: error: unknown config name") and "Traceback" not in err


@pytest.mark.slow
def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "bamboo", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("bamboo ")


def test_calibrate_command_writes_a_predictor_file(capsys, tmp_path):
    from bamboo.calibrate import Predictors

    out = tmp_path / "p.safetensors"
    assert main(["calibrate", "--batches", "3", "--batch-size", "2", "--seq-len", "32", "--epochs", "1",
                 "--rank", "8", "--out", str(out), "--json", str(tmp_path / "p.json")]) == 0
    assert "model.layers.5.mlp" in capsys.readouterr().out
    assert len(Predictors.load(out)) == 6 and (tmp_path / "p.json").exists()


@pytest.mark.filterwarnings("ignore")
def test_export_commands(capsys, tmp_path):
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    from bamboo.onnx.tensorrt_profile import check_tensorrt_profile

    assert main(["export-onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["onnx-optimize", str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")]) == 0
    assert "0 FFN(s) rewritten" in capsys.readouterr().out  # bamboo's own export is already sparse
    assert main(["export-tensorrt", "--out", str(tmp_path / "t.onnx"), "--engine", str(tmp_path / "t.engine")]) == 0
    out = capsys.readouterr().out
    assert "TensorRT profile" in out and check_tensorrt_profile(tmp_path / "t.onnx") == []


def test_generate_streams_text_and_reports_speed(capsys):
    pytest.importorskip("mistral_common", reason="the tokenizer extra is not installed")
    assert main(["generate", "It is a truth universally acknowledged", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It is a truth universally acknowledged") and "6 tokens; decode" in out
