"""The README cannot drift: its Python blocks run, and CI runs its Quick start word for word."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_blocks_run(tmp_path, monkeypatch):
    """All Python blocks in order, in one namespace (later ones use names of earlier ones)."""
    monkeypatch.chdir(tmp_path)
    namespace = {}
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block.replace("epochs=1", "epochs=1, progress=False"), "README.md", "exec"),
             namespace)
    assert (tmp_path / "mnist.npz").exists()


def test_ci_runs_the_quick_start_commands():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (commands,) = _blocks("bash")[:1]
    assert commands in quick_start
    lines = [line for line in commands.strip().splitlines() if line.strip()]
    assert len(lines) == 2, "the Quick start is two commands: install and run, then test"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for line in lines:
        assert line in ci, f".ci/run does not run the README's command: {line}"



def test_gpu_install_says_which_extra_to_pick():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    gpu = quick_start.split("For an NVIDIA GPU", 1)[1]
    assert "nvidia-smi" in gpu and '"CUDA Version"' in gpu
    assert "12.x takes `cuda12`, 13.x takes `cuda13`" in gpu
    assert "Google Colab" in gpu and "no extra" in gpu
    extras = (ROOT / "pyproject.toml").read_text()
    for extra in set(re.findall(r'pip install -e "\.\[(\w+)\]"', gpu)):
        assert f"\n{extra} = " in extras, f"the README installs an extra {extra} pyproject lacks"
