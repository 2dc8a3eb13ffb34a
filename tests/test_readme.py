"""The README cannot rot: every command it shows parses with the script it names, CI runs its test
command, and its quickstart pipeline (demo.py) runs end to end at a small size."""

import importlib
import json
import os
import re
import shlex

import pytest

from conftest import ROOT, run_script

SCRIPTS = ("train_tokenizer", "train_dit", "train_t2i", "sample", "sample_t2i", "fid", "bench",
           "demo", "cfg_search")


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_commands():
    """Every `python X.py ...` / `torchrun ... X.py ...` in the README's code blocks and inline
    code."""
    text = readme()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            if words and words[0] in ("python", "python3", "torchrun") and scripts:
                i = scripts[0]
                commands.append((words[i][:-3], words[i + 1:]))
    return commands


def test_readme_shows_the_main_commands():
    names = {name for name, _ in readme_commands()}
    assert {"demo", "train_tokenizer", "train_dit", "sample", "fid"} <= names


@pytest.mark.parametrize("script,argv", readme_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_readme_command_parses(script, argv):
    assert script in SCRIPTS, f"the README runs an unknown script {script}.py"
    importlib.import_module(script).parse_args(argv)  # exits (SystemExit) on an unknown flag


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_stands_on_its_own(script, capsys):
    """--help cites nothing outside the repository, shows every default, and its usage examples
    are intact."""
    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args(["--help"])
    text = capsys.readouterr().out
    assert "SPEC" not in text and "shared/" not in text
    for flag in ("--steps", "--batch_size", "--lr", "--model", "--num_workers"):
        if f"  {flag} " in text:  # the flag's own help entry
            entry = text.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0]
            assert "default" in entry, (flag, entry)
    # A `\` continuation in a docstring would join two commands on one line.
    for line in text.splitlines():
        assert line.count("torchrun") <= 1 and line.count("python ") <= 1, line


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", readme(), flags=re.S)
    quickstart = blocks[0].splitlines()
    test_cmd = next(line for line in quickstart if "pytest" in line)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert test_cmd.strip() in ci


def test_demo_pipeline_end_to_end(tmp_path):
    """The quickstart's `python demo.py`, at its small size: every stage of the method in turn."""
    out = tmp_path / "runs"
    # No pretrained files: random stand-ins.
    proc = run_script(["demo.py", "--tiny", "--out", str(out), "--device", "cpu"], timeout=600,
                      env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a small RANDOM ViT" in proc.stdout and "Done in" in proc.stdout
    # Each step shows its progress on the console and ends with a one-line result.
    assert "it/s" in proc.stdout and "==> done in" in proc.stdout
    assert ": PSNR " in proc.stdout and ": FID " in proc.stdout and ": loss " in proc.stdout
    for path in ("tokenizer/stage1/tokenizer.pt", "tokenizer/stage2/tokenizer.pt",
                 "tokenizer/stage3/tokenizer.pt", "tokenizer/stage3/recon_0000002.png",
                 "tokenizer/stage3/curves.png", "latents/meta.json", "dit/ckpt.pt",
                 "dit/samples_0000020.png", "dit/curves.png", "dit/samples/grid_cfg1.5_steps4.png",
                 "dit/samples/fid/samples.npz"):
        assert (out / path).exists(), path
    recon = json.load(open(out / "tokenizer" / "eval.json"))
    fid = json.load(open(out / "fid.json"))
    assert recon["images"] == 32 and recon["psnr"] > 0
    assert fid["num_samples"] == 8 and fid["num_reference"] == 32 and fid["fid"] >= 0
    assert "RANDOM" in fid["inception_weights"]
    # Run again: everything is found finished and only re-exported (resumable pipeline).
    again = run_script(["demo.py", "--tiny", "--out", str(out), "--device", "cpu"], timeout=600,
                       env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # The text-to-image demo on the same tokenizer: a random byte-level T5, the captions, prompt
    # samples.
    t2i = run_script(["demo.py", "--tiny", "--t2i", "--out", str(out), "--device", "cpu"],
                     timeout=600, env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert t2i.returncode == 0, t2i.stdout[-3000:] + t2i.stderr[-3000:]
    assert "a small RANDOM byte-level T5" in t2i.stdout and "train_t2i.py" in t2i.stdout
    for path in ("text_encoder/config.json", "t2i/ckpt.pt", "t2i/samples_0000004.png",
                 "t2i/samples/grid_cfg4_steps50.png"):
        assert (out / path).exists(), path
