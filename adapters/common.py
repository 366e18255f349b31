"""What every adapter family does the same way: its models/ folder, reading its weight file with clear
errors, refusing non-finite settings, quoting user input in messages, and reading the sampler's state
(cond/uncond rows, current sigma and step) from ComfyUI's ``transformer_options``.
"""
import json
import math
import os
import pickle
import struct
import zipfile

import torch

import folder_paths

QUOTE_LIMIT = 200  # characters of user input quoted in any message
COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond tags: the chunk's index in [positive, negative]


class ModelFileError(ValueError):
    """A model file that is missing or cannot be read; the message names the file, the folder and what to put there."""


class SettingError(ValueError):
    """A node setting that cannot be used (NaN, infinity); the message names the input."""


def quote(text, limit=QUOTE_LIMIT):
    """``repr(text)``, cut to about ``limit`` characters with the full length noted, for error messages."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_finite(node, **settings):
    """Raise SettingError naming the first of ``settings`` (input name -> number) that is NaN or infinite;
    ComfyUI's own validation lets NaN through."""
    for name, value in settings.items():
        if not math.isfinite(float(value)):
            raise SettingError(f"{node}: {name} is {value}; give a finite number (NaN and infinity are not settings)")


class ModelFolder:
    """One ``models/<name>/`` folder of ComfyUI (plus any ``<name>:`` paths of extra_model_paths.yaml):
    registration, file lookup, and reading a weight file with errors that say what to put there."""

    def __init__(self, name, label, expected, error_class=ModelFileError):
        self.name = name          # folder_paths key and folder name
        self.label = label        # "IP-Adapter", "MIGC", ... for messages
        self.expected = expected  # what belongs there, e.g. "ip-adapter_sd15.safetensors (h94/IP-Adapter)"
        self.error_class = error_class  # a ModelFileError subclass of the family

    def register(self):
        """Add models/<name>/ to ComfyUI's folders, keeping paths another pack or extra_model_paths.yaml
        registered under the same name, and accept every PyTorch/safetensors extension."""
        default = os.path.join(folder_paths.models_dir, self.name)
        paths, extensions = folder_paths.folder_names_and_paths.get(self.name, ([], set()))
        if default not in paths:
            paths = list(paths) + [default]
        folder_paths.folder_names_and_paths[self.name] = (paths, set(extensions) | folder_paths.supported_pt_extensions)

    def what_to_do(self):
        return f"Put {self.expected} in models/{self.name}/ and select it in the {self.label} loader"

    def error(self, file_name, problem):
        return self.error_class(f"{self.label} file {quote(file_name)} (models/{self.name}/): {problem}. "
                                f"{self.what_to_do()}.")

    def full_path(self, file_name):
        path = folder_paths.get_full_path(self.name, file_name)
        if path is None:
            for folder in folder_paths.get_folder_paths(self.name):  # there, but not a file ComfyUI accepts
                candidate = os.path.join(folder, os.path.relpath(os.path.join("/", file_name), "/"))
                if os.path.lexists(candidate):
                    raise self.error(file_name, _unreadable(candidate) or "it is not a regular file")
            searched = ", ".join(folder_paths.get_folder_paths(self.name)) or "no folder registered"
            raise self.error_class(f"{self.label} file {quote(file_name)} not found in models/{self.name}/ "
                                 f"(searched: {searched}). {self.what_to_do()}.")
        return path

    def read(self, file_name):
        """The tensors of a file of this folder: a .safetensors file, or a PyTorch pickle read with
        ``weights_only=True`` (a file that needs code execution is refused before anything in it runs)."""
        path = self.full_path(file_name)
        problem = _unreadable(path)
        if problem:
            raise self.error(file_name, problem)
        try:
            if _is_safetensors(path):
                import safetensors.torch

                return safetensors.torch.load_file(path, device="cpu")
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "global" in str(error).lower():  # the weights_only unpickler met a class or function reference
                raise self.error(file_name, "it was refused: it contains pickled Python objects that need code "
                                 "execution to load, and this loader only reads tensors (torch.load weights_only=True; "
                                 "nothing from the file was run)") from None
            raise self.error(file_name, "it is not a checkpoint (not a readable PyTorch file)") from None
        except Exception as error:  # damaged archives and headers: every library raises its own type
            raise self.error(file_name, f"it is damaged or incomplete ({type(error).__name__} while reading it); "
                                        f"download it again") from None


def _is_safetensors(path):
    return path.lower().endswith((".safetensors", ".sft"))


def _unreadable(path):
    """Why the file at ``path`` is not a model file, judged from its first bytes and size, or None."""
    link = " (a symbolic link)" if os.path.islink(path) else ""
    if not os.path.isfile(path):
        return f"it is not a regular file{link}"
    size = os.path.getsize(path)
    if size == 0:
        return f"it is empty (0 bytes){link}: the download did not finish"
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except OSError as error:
        return f"it cannot be opened ({error.strerror}){link}"
    if head.lstrip()[:1] == b"<":  # no model format starts with "<"; web pages and XML do
        return f"it is a web page (HTML) saved under a model file name{link}, not a checkpoint"
    if _is_safetensors(path):
        if size < 8:
            return f"it is not a safetensors file ({size} bytes){link}"
        (header_size,) = struct.unpack("<Q", head[:8])
        if header_size > size - 8:
            return (f"it is not a complete safetensors file: its header claims {header_size} bytes, the file has "
                    f"{size}{link} (truncated download or another kind of file)")
        if head[8:9] != b"{":
            return f"it is not a safetensors file{link} (no JSON header)"
        try:
            with open(path, "rb") as fh:
                fh.seek(8)
                header = json.loads(fh.read(header_size))
            data_end = max([end for entry in header.values() if isinstance(entry, dict)
                            for end in entry.get("data_offsets", [0])] or [0])
        except (ValueError, TypeError, AttributeError):
            return f"it is not a safetensors file{link} (its header is not valid JSON)"
        if 8 + header_size + data_end > size:
            return (f"it is not a complete safetensors file: it has {size} bytes, its header describes "
                    f"{8 + header_size + data_end}{link} (truncated download)")
        return None
    if head[:4] == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            return f"it is an incomplete PyTorch archive{link} (truncated download)"
        return None
    if head[:1] == b"\x80":  # legacy (non-zip) torch.save pickle
        return None
    return f"it is not a checkpoint{link} (neither a PyTorch file nor safetensors)"


# ---------------------------------------------------------------- the sampler's state in transformer_options

def row_kinds(transformer_options, batch):
    """COND or UNCOND for each of the ``batch`` rows of a UNet call (ComfyUI batches chunks of equal size
    and lists their kinds in ``cond_or_uncond``; a call outside a sampler counts as one cond chunk)."""
    chunks = transformer_options.get("cond_or_uncond") or [COND]
    per_chunk = batch // len(chunks)
    return [kind for kind in chunks for _ in range(per_chunk)]


def cond_rows(transformer_options, batch):
    """Indices of the cond rows of a UNet call of ``batch`` rows."""
    return [row for row, kind in enumerate(row_kinds(transformer_options, batch)) if kind == COND]


def current_sigma(transformer_options):
    """The sigma of this UNet call (every row of a call shares it), or None outside a sampler."""
    sigmas = transformer_options.get("sigmas")
    return None if sigmas is None else float(sigmas.max())


def step_index(sigma, sample_sigmas):
    """Index i of the sampling step that sigma belongs to: the number of schedule sigmas >= sigma,
    minus one (a sigma between sigma_i and sigma_{i+1}, as multistage samplers use, counts as step i;
    one above sigma_0 counts as step 0)."""
    schedule = sample_sigmas.to(torch.float64).flatten()
    return max(0, int((schedule >= float(sigma) * (1 - 1e-5)).sum().item()) - 1)


def current_step(transformer_options):
    """The index of the sampling step of this UNet call, or None when the sampler gives no schedule."""
    sigma, schedule = current_sigma(transformer_options), transformer_options.get("sample_sigmas")
    return None if sigma is None or schedule is None else step_index(sigma, schedule)


def check_latent_size(node, width, height, transformer_options, error=ValueError):
    """Raise ``error`` when the latent being sampled is not the width x height (pixels) a node was set for."""
    shape = transformer_options.get("original_shape")
    if shape is not None and tuple(shape[-2:]) != (height // 8, width // 8):
        raise error(
            f"{node} was set for a {width}x{height} image (latent {width // 8}x{height // 8}) but the sampler's "
            f"latent is {shape[-1]}x{shape[-2]} ({shape[-1] * 8}x{shape[-2] * 8} pixels); set {node}'s width "
            f"and height to the image size")
