"""The README's promises that code can check: its node reference matches the nodes' declarations, and
its demo command writes the control-transfer grid and rates, the workflow's images and a summary."""
import importlib.util
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _node_reference_script():
    path = os.path.join(REPO_ROOT, "scripts", "node_reference.py")
    spec = importlib.util.spec_from_file_location("node_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_node_reference_matches_the_nodes(pack):
    script = _node_reference_script()
    with open(script.README) as fh:
        readme = fh.read()
    reference = script.node_reference(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)
    wanted = script.render_readme(readme, reference)
    assert readme == wanted, "README.md's node reference is stale: run .venv/bin/python scripts/node_reference.py"
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert f"(`{name}`," in readme
        for section in ("required", "optional"):
            for input_name in cls.INPUT_TYPES().get(section, {}):
                assert f"| `{input_name}` |" in readme, f"{name}.{input_name} is not documented"


def test_demo_command_writes_images_and_summary(tmp_path):
    """`make demo` runs scripts/demo.py: control transfer on the exact-mixture models (A knows the position,
    B the colour), then the shipped InteractDiffusion + MIGC workflow on tiny stand-ins."""
    from PIL import Image

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "demo.py"), "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    transfer = summary["control_transfer"]
    rates = {key: transfer[key] for key in ("main_alone", "aux_alone", "amdm", "amdm_linear")}
    assert all(0 <= rate <= 1 for rate in rates.values()) and transfer["samples_each"] >= 64
    # each model alone keeps the attribute it knows and gets the other by chance (1 in 4) ...
    assert transfer["details"]["main_alone"]["position"] == 1 and transfer["details"]["aux_alone"]["colour"] == 1
    assert max(rates["main_alone"], rates["aux_alone"]) < 0.45
    # ... AMDM gets both right far more often
    assert rates["amdm"] > max(rates["main_alone"], rates["aux_alone"]) + 0.25, rates
    assert rates["amdm_linear"] > max(rates["main_alone"], rates["aux_alone"]) + 0.25, rates
    settings = transfer["settings"]
    assert (settings["steps"], settings["cfg"], settings["aggregation_steps"], settings["weight_2"]) == (50, 7.5, 20, 0.5)
    grid = Image.open(out / transfer["grid"])
    assert grid.size[0] > 4 * 4 * 64 and grid.size[1] > 4 * 4 * 64  # 4 samplers x 4 prompts, 16 samples of 64 px each
    assert summary["workflow"] == "amdm_interactdiffusion_migc.json"
    assert len(summary["images"]) == 2 and all((out / image["file"]).stat().st_size > 0 for image in summary["images"])
    assert {image["title"] for image in summary["images"]} == {"AMDM result", "Without aggregation"}
    assert any(key.endswith("AMDMAggregateSampler") for key in summary["node_seconds"])
    sampler = next(p for p in summary["amdm_parameters"].values() if p["class_type"] == "AMDMAggregateSampler")
    assert (sampler["steps"], sampler["aggregation_steps"], sampler["weight_2"]) == (50, 20, 0.5)
    # main InteractDiffusion and aux MIGC share one forward per step (each with cond and uncond batched) for
    # 50 steps (the aux branch's 21 included), and the side output KSampler (InteractDiffusion) 50 more
    assert summary["unet_calls"] == 50 + 50
