"""Installing the pack the way ComfyUI-Manager and the Comfy Registry do, and the registry metadata.

ComfyUI-Manager clones the repository into custom_nodes/comfyui-amdm, runs `pip install -r
requirements.txt` in ComfyUI's environment, then `install.py` if there is one. Here: the repository's
files (git's tracked and not-ignored ones, as a clone has them) are COPIED into a fresh base directory's
custom_nodes, the requirements are installed into the test runtime, and the real server must then list
every node, serve the web extension and offer the workflows in its template browser.

A registry install unpacks the zip `comfy node pack` built into custom_nodes/<node id>
(custom_nodes/amdm-aggregation): the zip is built here by the same rules and installed under that
second folder name, where the server must serve the same.
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile

from PIL import Image

from harness.server import ComfyServer
from harness.workflow_files import REPO_ROOT, REQUIRED_WORKFLOWS, shipped_workflows

CLONE_NAME = "comfyui-amdm"  # the folder name a `git clone` of the repository gives
# What runs in ComfyUI, plus the license and the metadata: the registry zip's top-level entries.
ZIP_TOP_LEVEL = {"__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt",
                 "adapters", "amdm_core", "comfy_bridge", "nodes", "web", "workflows"}


# node-semver, installed pinned by scripts/setup_node_tools.sh (make test runs it)
NODE_SEMVER = os.path.join(REPO_ROOT, ".node_modules_test", "node_modules", "semver")
# The ComfyUI versions the Manager must not flag: the two tested ones and the newest users run.
COMFYUI_VERSIONS_ADMITTED = ("0.3.75", "0.33.0", "0.38.1")
# comfy-cli's publish validation (comfy node validate / publish): every comma-separated part of
# requires-comfyui is [operator]major.minor.patch[-suffix]; anything else drops the field with a warning.
COMFY_CLI_VERSION_PART = re.compile(r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?")


def pyproject():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def git_files(*options):
    listing = subprocess.run(["git", "ls-files", "-z", *options], cwd=REPO_ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")
    return {path for path in listing if path}


def registry_zip(path):
    """The zip `comfy node pack` (comfy-cli) builds, by its rules: git's tracked files less those that
    match a pattern of .comfyignore (gitignore syntax; git itself matches them here), plus the folders
    of [tool.comfy] includes (the pack has none). Same file list as comfy-cli 1.23.0's `comfy node pack`
    on this repository (compared when .comfyignore was written). Returns the zip's names."""
    assert not pyproject()["tool"]["comfy"].get("includes"), "[tool.comfy] includes: add them here"
    ignored = git_files("--cached", "--ignored", "--exclude-from=.comfyignore")
    names = sorted(name for name in git_files() - ignored if os.path.isfile(os.path.join(REPO_ROOT, name)))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.write(os.path.join(REPO_ROOT, name), name)
    return names


def fetch_text(server, path):
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return response.read().decode()


def assert_pack_served(server, folder, node_names):
    """Every node listed from ``folder``, the box editor's script served, the workflows listed and served."""
    info = server.get("/object_info")
    missing = sorted(name for name in node_names if name not in info)
    assert not missing, f"/object_info lacks {missing}:\n{server.log()}"
    assert all(info[name]["python_module"].endswith(folder) for name in node_names)
    script = f"/extensions/{folder}/amdm_box_editor.js"
    assert script in server.get("/extensions")
    assert re.search(r'registerExtension\(\{\s*name: "amdm-aggregation\.BoxEditor"', fetch_text(server, script))
    templates = server.get("/workflow_templates")[folder]
    assert set(shipped_workflows()) <= set(templates)
    workflow = server.get(f"/api/workflow_templates/{folder}/{REQUIRED_WORKFLOWS[0]}.json")
    assert workflow["nodes"]
    timing = [line for line in server.log().splitlines() if "seconds" in line and line.rstrip().endswith(folder)]
    assert len(timing) == 1 and "IMPORT FAILED" not in timing[0], server.log()


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
        assert_pack_served(server, CLONE_NAME, pack.NODE_CLASS_MAPPINGS)


def test_registry_zip_holds_only_what_runs_in_comfyui(tmp_path):
    names = registry_zip(tmp_path / "node.zip")
    assert {name.split("/")[0] for name in names} == ZIP_TOP_LEVEL
    for name in shipped_workflows():
        assert {f"workflows/{name}.json", f"workflows/{name}.jpg"} <= set(names)
    assert "web/amdm_box_editor.js" in names
    assert (tmp_path / "node.zip").stat().st_size < 400_000


def test_registry_install_works_under_the_node_id_folder(tmp_path, pack):
    """The registry zip unpacked into custom_nodes/<node id>, a folder name other than a clone's."""
    folder = pyproject()["project"]["name"]
    assert folder != CLONE_NAME
    buffer = io.BytesIO()
    registry_zip(buffer)
    base = tmp_path / "base"
    with zipfile.ZipFile(buffer) as archive:
        archive.extractall(base / "custom_nodes" / folder)
    with ComfyServer(str(base), install_pack=False) as server:
        assert_pack_served(server, folder, pack.NODE_CLASS_MAPPINGS)


def test_registry_metadata():
    """pyproject.toml as the Comfy Registry requires it; requirements that cannot replace ComfyUI's torch."""
    meta = pyproject()
    project, comfy = meta["project"], meta["tool"]["comfy"]
    name = project["name"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name) and len(name) < 100
    assert "comfyui" not in name.lower(), "the registry asks for node ids without 'ComfyUI'"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert os.path.isfile(os.path.join(REPO_ROOT, project["license"]["file"]))
    with open(os.path.join(REPO_ROOT, project["license"]["file"])) as fh:
        assert "GNU GENERAL PUBLIC LICENSE" in fh.read(200)
    # the URL keys comfy-cli reads (Homepage, Documentation, Repository, Issues)
    assert set(project["urls"]) <= {"Homepage", "Documentation", "Repository", "Issues"}
    assert all(project["urls"][key].startswith("https://") for key in ("Repository", "Documentation", "Issues"))
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    icon = os.path.join(REPO_ROOT, *comfy["Icon"].split("/main/", 1)[1].split("/"))
    with Image.open(icon) as image:  # the registry's limits: SVG/PNG/JPG/GIF, at most 800 x 400
        assert image.format in ("PNG", "JPEG", "GIF") and image.width <= 800 and image.height <= 400
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as fh:
        requirements = [line.split("#")[0].strip() for line in fh]
    assert not any(re.match(r"(torch|torchvision|torchaudio)\b", r) for r in requirements if r)


def manager_admits(versions, version_range):
    """For each version, what the Manager of frontend 1.5x decides (useConflictDetection ->
    checkVersionCompatibility): semver.satisfies(semver.clean(version) || version, range), run by node-semver."""
    if not os.path.isfile(os.path.join(NODE_SEMVER, "package.json")):
        raise FileNotFoundError(f"node-semver is not installed at {NODE_SEMVER}: run bash scripts/setup_node_tools.sh")
    script = ("const semver = require(process.argv[1]); const [range, ...versions] = process.argv.slice(2);"
              "console.log(JSON.stringify(versions.map(v => semver.satisfies(semver.clean(v) || v, range))));")
    result = subprocess.run(["node", "-e", script, NODE_SEMVER, version_range, *versions],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_requires_comfyui_is_read_as_meant_by_the_manager_and_by_comfy_cli():
    """The range admits both tested ComfyUIs and the newer ones users run, in node-semver (what the
    Manager evaluates) and in comfy-cli's format; it is not vacuous (an older ComfyUI is flagged), and the
    comma form it replaces is what node-semver rejects for every version."""
    version_range = pyproject()["tool"]["comfy"]["requires-comfyui"]
    assert manager_admits(COMFYUI_VERSIONS_ADMITTED, version_range) == [True] * len(COMFYUI_VERSIONS_ADMITTED)
    assert manager_admits(["v0.3.75", "0.3.74"], version_range) == [True, False]
    assert all(COMFY_CLI_VERSION_PART.fullmatch(part.strip()) for part in version_range.split(","))
    assert manager_admits(COMFYUI_VERSIONS_ADMITTED, ">=0.3.75,<=0.33.0") == [False] * 3
