"""The README's promises that code can check: its node reference matches the nodes' declarations, and
its demo command writes images and a summary."""
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
    """`make demo` runs scripts/demo.py: the shipped InteractDiffusion + MIGC workflow on tiny stand-ins."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "demo.py"), "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workflow"] == "amdm_interactdiffusion_migc.json"
    assert len(summary["images"]) == 2 and all((out / image["file"]).stat().st_size > 0 for image in summary["images"])
    assert {image["title"] for image in summary["images"]} == {"AMDM result", "Without aggregation"}
    assert any(key.endswith("AMDMAggregateSampler") for key in summary["node_seconds"])
    sampler = next(p for p in summary["amdm_parameters"].values() if p["class_type"] == "AMDMAggregateSampler")
    assert (sampler["steps"], sampler["aggregation_steps"], sampler["weight_2"]) == (50, 20, 0.5)
    # main InteractDiffusion (cond and uncond in separate passes: GLIGEN-style patches differ) for 50 steps,
    # aux MIGC (one batched pass) for s + 1 = 21 steps, and the side output KSampler (InteractDiffusion) 50 x 2
    assert summary["unet_calls"] == 50 * 2 + 21 + 50 * 2
