"""Start the real ComfyUI server (main.py) on 127.0.0.1 with this pack installed; always stops it.

    with ComfyServer(base_dir) as server:
        prompt_id = server.queue(prompt)
        history = server.wait(prompt_id)
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from . import runtime

# A test/demo-only custom node that registers the tiny model configs inside the server process.
TINY_MODELS_NODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_models_node")
FRONTENDS_DIR = os.path.join(runtime.PACK_ROOT, ".frontends")
_TOP_LEVEL_SKIP = {"models", "custom_nodes", "output", "input", "user", "temp", ".git",
                   "extra_model_paths.yaml", "tests", "tests-unit"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def frontend_root(version):
    """The static folder of frontend ``version`` installed by scripts/setup_frontends.sh."""
    root = os.path.join(FRONTENDS_DIR, version, "comfyui_frontend_package", "static")
    if not os.path.isfile(os.path.join(root, "index.html")):
        raise FileNotFoundError(f"frontend {version} is not installed at {root}: run `make env` "
                                f"(or FRONTENDS={version} bash scripts/setup_frontends.sh)")
    return root


def comfyui_copy(dest_root):
    """A runnable copy of the ComfyUI program folder (no models, no custom nodes, no extra-paths yaml:
    the vendored one points at a folder that does not exist)."""
    dest = os.path.join(dest_root, "ComfyUI")
    if not os.path.isdir(dest):
        source = runtime.comfyui_dir()

        def skip(folder, names):
            top = _TOP_LEVEL_SKIP if os.path.samefile(folder, source) else set()
            return [n for n in names if n in top or n == "__pycache__"]

        shutil.copytree(source, dest, ignore=skip)
    return dest


class ComfyServer:
    def __init__(self, base_dir, install_pack=True, tiny_models=False, threads=None, extra_args=(), log_path=None,
                 frontend=None):
        """``tiny_models``: also install harness/tiny_models_node, so the server's loaders accept the tiny
        test weights; ``threads``: the server's OMP_NUM_THREADS (default 1, as in runtime.boot);
        ``frontend``: a frontend version from .frontends/ served with --front-end-root (None: the one
        installed in the venv)."""
        self.base_dir = os.path.abspath(base_dir)
        self.frontend = frontend
        self.install_pack = install_pack
        self.tiny_models = tiny_models
        self.threads = threads
        self.extra_args = list(extra_args)
        self.log_path = log_path or os.path.join(self.base_dir, "server.log")
        self.port = None
        self.process = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=120):
        program = comfyui_copy(os.path.dirname(self.base_dir))
        custom_nodes = os.path.join(self.base_dir, "custom_nodes")
        os.makedirs(custom_nodes, exist_ok=True)
        link = os.path.join(custom_nodes, runtime.PACK_DIR_NAME)
        if self.install_pack and not os.path.exists(link):
            os.symlink(runtime.PACK_ROOT, link)
        tiny_link = os.path.join(custom_nodes, "amdm_tiny_models")
        if self.tiny_models and not os.path.exists(tiny_link):
            os.symlink(TINY_MODELS_NODE, tiny_link)
        self.port = free_port()
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--use-pytorch-cross-attention", "--preview-method", "none",
               *self.extra_args]
        if self.frontend:
            cmd += ["--front-end-root", frontend_root(self.frontend)]
        threads = str(self.threads or 1)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=program, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"ComfyUI server exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI server did not answer within {timeout}s:\n{self.log()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def log(self):
        try:
            with open(self.log_path) as fh:
                return fh.read()[-6000:]
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path, payload):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def queue(self, prompt):
        """POST an API-format graph; returns its prompt id. A 400 raises with ComfyUI's error body."""
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": "amdm-tests"})["prompt_id"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"/prompt refused the graph ({err.code}): {err.read().decode()}") from err

    def wait(self, prompt_id, timeout=300):
        """Poll /history until the prompt is done; returns its history entry (raises on error status)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") == "error":
                    raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(entry['status'])[:3000]}")
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server died while running the prompt:\n{self.log()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s")
