"""7. The AMDM nodes as graphs: through ComfyUI's real validator and executor, and once through the real
server over HTTP. Results are read back from SaveLatent files and compared with direct node calls."""
import os

import pytest
import safetensors.torch
import torch


SETTINGS = {"seed": 5, "steps": 5, "cfg": 7.5, "cfg_2": 6.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "denoise": 1.0, "weight_2": 0.5, "aggregation_steps": 3, "aggregation": "paper", "deviation_step": 0.3,
            "mean_mode": "reference", "noise": "independent"}
TEXTS = {"positive": "a girl with red hair", "negative": "blurry", "positive_2": "a blue bottle on a table",
         "negative_2": "lowres"}


def base_graph(checkpoint_name):
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
             "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    for name, text in TEXTS.items():
        graph[name] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
    return graph


def sampler_graph(checkpoint_name, prefix, **overrides):
    graph = base_graph(checkpoint_name)
    inputs = {"model": ["ckpt", 0], "model_2": ["ckpt", 0], "latent_image": ["latent", 0]}
    inputs.update({name: [name, 0] for name in TEXTS})
    inputs.update(SETTINGS, **overrides)
    graph["amdm"] = {"class_type": "AMDMAggregateSampler", "inputs": inputs}
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["amdm", 0], "filename_prefix": prefix}}
    return graph


def add_guider_branch(graph, prefix):
    """The same AMDM run as AMDM Guider + SamplerCustomAdvanced."""
    graph.update({
        "g1": {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["positive", 0],
                                                     "negative": ["negative", 0], "cfg": SETTINGS["cfg"]}},
        "g2": {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["positive_2", 0],
                                                     "negative": ["negative_2", 0], "cfg": SETTINGS["cfg_2"]}},
        "amdm_guider": {"class_type": "AMDMGuider", "inputs": {
            "guider": ["g1", 0], "guider_2": ["g2", 0], "weight_2": SETTINGS["weight_2"],
            "aggregation_steps": SETTINGS["aggregation_steps"], "aggregation": SETTINGS["aggregation"],
            "deviation_step": SETTINGS["deviation_step"], "mean_mode": SETTINGS["mean_mode"],
            "noise": SETTINGS["noise"]}},
        "select": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": SETTINGS["sampler_name"]}},
        "sched": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": SETTINGS["scheduler"],
                                                             "steps": SETTINGS["steps"], "denoise": 1.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SETTINGS["seed"]}},
        "custom": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["amdm_guider", 0], "sampler": ["select", 0], "sigmas": ["sched", 0],
            "latent_image": ["latent", 0]}},
        "save_guider": {"class_type": "SaveLatent", "inputs": {"samples": ["custom", 0], "filename_prefix": prefix}},
    })
    return graph


def saved_latent(output_dir, prefix):
    path = os.path.join(output_dir, f"{prefix}_00001_.latent")
    assert os.path.isfile(path), f"SaveLatent wrote no {path}"
    return safetensors.torch.load_file(path)["latent_tensor"]


@pytest.fixture(scope="module")
def direct_result(comfy, pack, checkpoint):
    """The same run as a direct node call on the checkpoint loaded by the checkpoint fixture (one torch
    thread: the reduction order, hence the last bits, depends on the thread count)."""
    model, clip, _ = checkpoint
    encoded = {name: comfy.CLIPTextEncode().encode(clip, text)[0] for name, text in TEXTS.items()}
    with torch.inference_mode():
        out, _ = pack.NODE_CLASS_MAPPINGS["AMDMAggregateSampler"]().sample(
            model=model, model_2=model, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, **encoded, **SETTINGS)
    return out["samples"]


def test_executor_runs_both_nodes_and_matches_direct_calls(run_graph, tiny_checkpoint, comfy_base, direct_result):
    graph = add_guider_branch(sampler_graph(tiny_checkpoint, "amdm_executor"), "amdm_executor_guider")
    run_graph(graph)
    output_dir = os.path.join(comfy_base, "output")
    assert torch.equal(saved_latent(output_dir, "amdm_executor"), direct_result)
    assert torch.equal(saved_latent(output_dir, "amdm_executor_guider"), direct_result)


def test_executor_reports_bad_inputs_before_running(run_graph, tiny_checkpoint):
    from harness.executor import GraphError

    with pytest.raises(GraphError) as invalid:
        run_graph(sampler_graph(tiny_checkpoint, "amdm_bad_weight", weight_2=1.5))
    assert "weight_2" in str(invalid.value.details)
    with pytest.raises(GraphError, match="aggregation_steps s = 9 but this run has 5 sampling steps"):
        run_graph(sampler_graph(tiny_checkpoint, "amdm_bad_window", aggregation_steps=9))


def test_server_runs_the_sampler_over_http(comfy_server, tiny_checkpoint, direct_result):
    server = comfy_server(tiny_models=True)  # one torch thread, as in direct_result
    history = server.wait(server.queue(sampler_graph(tiny_checkpoint, "amdm_http")))
    assert history["status"]["status_str"] == "success"
    assert torch.equal(saved_latent(os.path.join(server.base_dir, "output"), "amdm_http"), direct_result)
