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
    assert main(["export-tensorrt", "--out", str(tmp_path / "t.onnx")]) == 0
    out = capsys.readouterr().out
    assert "TensorRT profile" in out and check_tensorrt_profile(tmp_path / "t.onnx") == []


def test_generate_streams_text_and_reports_speed(capsys):
    pytest.importorskip("mistral_common", reason="the tokenizer extra is not installed")
    assert main(["generate", "It is a truth universally acknowledged", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It is a truth universally acknowledged") and "6 tokens; decode" in out
    assert "first decode step, which compiles, not timed" in out and "dense (eager, uncompiled) on cpu" in out


# -- first contact: every error names the problem and the fix, as one line, with exit code 2 ---------------------

def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bamboo: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from bamboo.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"demo", "inspect", "calibrate", "generate", "export-onnx", "export-tensorrt",
                             "onnx-optimize"}
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"bamboo {name} {action.dest} has no help text"
            if action.option_strings:
                assert f"(default: {action.default})" in text, f"bamboo {name} {action.dest} hides its default"


def test_calibrate_to_an_unwritable_path_fails_before_calibrating(capsys, tmp_path, monkeypatch):
    import bamboo

    monkeypatch.setattr(bamboo, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking --out"))
    (tmp_path / "a-file").write_text("")
    err = one_line_error(capsys, ["calibrate", "--out", str(tmp_path / "a-file" / "p.safetensors")])
    assert "cannot write the predictor file to" in err and "choose a writable path" in err


def test_calibrate_with_rank_zero(capsys):
    assert "rank must be an integer >= 1, got 0" in one_line_error(capsys, ["calibrate", "--rank", "0"])


def test_export_onnx_to_an_unwritable_path(capsys, tmp_path):
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    (tmp_path / "a-file").write_text("")
    err = one_line_error(capsys, ["export-onnx", "--out", str(tmp_path / "a-file" / "m.onnx")])
    assert "cannot write the ONNX file to" in err


def test_export_tensorrt_engine_without_tensorrt_fails_before_exporting(capsys, tmp_path):
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    err = one_line_error(capsys, ["export-tensorrt", "--out", str(tmp_path / "t.onnx"),
                                  "--engine", str(tmp_path / "t.engine")])
    assert "--engine needs TensorRT and an NVIDIA GPU" in err and "Drop --engine" in err
    assert not (tmp_path / "t.onnx").exists() and not (tmp_path / "t.engine").exists()


def test_onnx_optimize_on_a_file_that_is_not_onnx(capsys, tmp_path):
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    (tmp_path / "notes.onnx").write_text("hello")
    err = one_line_error(capsys, ["onnx-optimize", str(tmp_path / "notes.onnx"), str(tmp_path / "out.onnx")])
    assert "notes.onnx is not an ONNX model" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_on_cuda_without_a_gpu(capsys):
    err = one_line_error(capsys, ["generate", "hello", "--device", "cuda"])
    assert "no CUDA device is visible here" in err and "device='cpu'" in err


def test_generate_chat_on_a_model_trained_on_plain_text(capsys):
    # austen-small ships the ChatML template (for transformers' apply_chat_template) but never saw it in training
    err = one_line_error(capsys, ["generate", "hello", "--chat"])
    assert "austen-small was trained on plain text" in err and "drop --chat" in err


def test_generate_chat_on_a_model_without_a_chat_template(capsys, tmp_path):
    import shutil

    from bamboo.models import pretrained_path

    shutil.copytree(pretrained_path(), tmp_path / "plain")
    (tmp_path / "plain" / "tokenizer_config.json").unlink()
    err = one_line_error(capsys, ["generate", "hello", "--chat", "--model", str(tmp_path / "plain")])
    assert "has no chat template" in err and "drop --chat" in err


def test_generate_chat_on_a_model_with_a_chat_template(capsys, tmp_path):
    pytest.importorskip("mistral_common", reason="the tokenizer extra is not installed")
    import shutil

    from bamboo.models import pretrained_path

    shutil.copytree(pretrained_path(), tmp_path / "chat")
    (tmp_path / "chat" / "tokenizer_config.json").write_text('{"chat_template": "chatml"}')
    (tmp_path / "chat" / "training.json").unlink()  # no record of plain-text training
    assert main(["generate", "hello", "--chat", "--model", str(tmp_path / "chat"), "--max-new-tokens", "3", "--sparsity", "dense",
                 "--no-compare-dense"]) == 0
    assert "3 tokens; decode" in capsys.readouterr().out


def test_decode_speed_leaves_out_the_first_decode_step():
    import time
    from types import SimpleNamespace

    from bamboo.cli import _decode_speed

    class SlowFirstStep:
        def generate(self, prompt, streamer, **kwargs):
            streamer(None)      # the prefill's token
            time.sleep(0.3)     # the first decode step compiles its graph
            streamer(None)
            for _ in range(4):
                time.sleep(0.01)
                streamer(None)

    args = SimpleNamespace(max_new_tokens=6, do_sample=False, temperature=1.0, top_p=1.0)
    count, speed = _decode_speed(SlowFirstStep(), None, args)
    assert count == 6 and 40 < speed < 110  # 4 steps in ~0.04 s; with the compile step it would be ~15


def test_generate_says_when_a_mode_is_slower_than_dense(capsys, monkeypatch):
    pytest.importorskip("mistral_common", reason="the tokenizer extra is not installed")
    import bamboo.cli as cli

    speeds = iter([(4, 10.0), (4, 20.0)])  # the compiled exact mode, then dense
    monkeypatch.setattr(cli, "_decode_speed", lambda *a, **k: next(speeds))
    assert main(["generate", "hello", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "dense (eager, uncompiled) on cpu: 20.0 tok/s" in out
    assert "exact mode with the eager backend is slower than dense on this device (0.50x)" in out
