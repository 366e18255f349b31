"""Installing the pack the way ComfyUI-Manager does, and the registry metadata.

ComfyUI-Manager clones the repository into custom_nodes/, runs `pip install -r requirements.txt` in
ComfyUI's environment, then `install.py` if there is one. Here: the repository's files (git's tracked
and not-ignored ones, as a clone has them) are COPIED into a fresh base directory's custom_nodes, the
requirements are installed into the test runtime, and the real server must then list every node,
serve the web extension and offer the example workflows in its template browser.
"""
import os
import re
import shutil
import subprocess
import sys
import tomllib

from PIL import Image

from harness.server import ComfyServer
from harness.workflow_files import REPO_ROOT, REQUIRED_WORKFLOWS

CLONE_NAME = "comfyui-amdm"  # the folder name a `git clone` of the repository gives


def repository_files():
    """Files a clone would contain (tracked + untracked-but-not-ignored, present on disk)."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                             check=True, capture_output=True).stdout.decode().split("\0")
    return sorted(path for path in listing if path and os.path.isfile(os.path.join(REPO_ROOT, path)))


def test_pack_installs_like_comfyui_manager_does(tmp_path, pack):
    base = tmp_path / "base"
    target = base / "custom_nodes" / CLONE_NAME
    files = repository_files()
    assert "__init__.py" in files and "requirements.txt" in files
    for path in files:
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO_ROOT, path), target / path)
    assert not (target / "install.py").exists(), "an install.py would run at install time: test it here"

    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r",
                          str(target / "requirements.txt")], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    with ComfyServer(str(base), install_pack=False) as server:
        assert not (base / "custom_nodes" / CLONE_NAME).is_symlink()
        info = server.get("/object_info")
        missing = sorted(name for name in pack.NODE_CLASS_MAPPINGS if name not in info)
        assert not missing, f"/object_info lacks {missing}:\n{server.log()}"
        assert all(info[name]["python_module"].endswith(CLONE_NAME) for name in pack.NODE_CLASS_MAPPINGS)
        assert f"/extensions/{CLONE_NAME}/amdm_box_editor.js" in server.get("/extensions")
        templates = server.get("/workflow_templates")[CLONE_NAME]
        assert set(REQUIRED_WORKFLOWS) <= set(templates)
        workflow = server.get(f"/api/workflow_templates/{CLONE_NAME}/{REQUIRED_WORKFLOWS[0]}.json")
        assert workflow["nodes"]
        log = server.log()
    timing = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith(CLONE_NAME)]
    assert len(timing) == 1 and "IMPORT FAILED" not in timing[0], log


def test_registry_metadata():
    """pyproject.toml as the Comfy Registry requires it; requirements that cannot replace ComfyUI's torch."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as fh:
        meta = tomllib.load(fh)
    project, comfy = meta["project"], meta["tool"]["comfy"]
    name = project["name"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name) and len(name) < 100
    assert "comfyui" not in name.lower(), "the registry asks for node ids without 'ComfyUI'"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert os.path.isfile(os.path.join(REPO_ROOT, project["license"]["file"]))
    with open(os.path.join(REPO_ROOT, project["license"]["file"])) as fh:
        assert "GNU GENERAL PUBLIC LICENSE" in fh.read(200)
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    icon = os.path.join(REPO_ROOT, *comfy["Icon"].split("/main/", 1)[1].split("/"))
    with Image.open(icon) as image:  # the registry's limits: SVG/PNG/JPG/GIF, at most 800 x 400
        assert image.format in ("PNG", "JPEG", "GIF") and image.width <= 800 and image.height <= 400
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as fh:
        requirements = [line.split("#")[0].strip() for line in fh]
    assert not any(re.match(r"(torch|torchvision|torchaudio)\b", r) for r in requirements if r)
