"""Bamboo's hub remote code was written for transformers 4.41 (a fork of its Mistral: SDPA attention with
`is_causal=... and q_len > 1`, `DynamicCache.from_legacy_cache`), and users load it on that version. This runs the
remote-code family of the transformers tests (inspect, compile, generate, export, export_onnx + ORT) and the Auto
class tests in a child process on transformers 4.41.2, installed once (without dependencies: the test venv's torch,
safetensors and friends serve it) into a cache directory put first on the child's path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PINS = ["transformers==4.41.2", "tokenizers==0.19.1", "huggingface_hub==0.23.5"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bamboo" / "transformers-4.41.2"


def _install() -> Path:
    if (CACHE / ".complete").exists():
        return CACHE
    staging = CACHE.with_name(CACHE.name + f".tmp{os.getpid()}")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging),
                             *PINS], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"could not install {' '.join(PINS)} (no package index?): {result.stderr[-500:]}")
    (staging / ".complete").touch()
    try:
        staging.rename(CACHE)
    except OSError:  # another run installed it meanwhile
        pass
    return CACHE


def test_the_bamboo_remote_code_on_transformers_4_41():
    site = _install()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             env=env, capture_output=True, text=True, cwd=ROOT)
    assert version.stdout.strip() == "4.41.2", version.stderr[-2000:]
    tests = ["-k", "bamboo_remote or auto_classes", "tests/integrations/test_transformers_models.py",
             "tests/integrations/test_auto_classes.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # every step ran: the five remote-code steps and the eight Auto-class tests, none skipped
    assert "13 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
