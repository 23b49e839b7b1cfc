# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""The ONNX export of a MedMoE folder's image side, keeping the sparse routing, beside the reader it feeds
(`onnx_image_encoder.py` describes the files; `python -m medmoe.training.export` is its command).

`export_image_side(folder)` writes FOLDER/onnx/: the vision pyramid and the router as one graph, each expert with the
image projection as its own, fp32 or, with `int8`, with their matrix products quantised to int8 (dynamic
quantisation: weights int8, activations quantised per call; no calibration data needed). The export is checked
against PyTorch on images made here: the same expert for every image, and the cosine similarity of the embeddings
(at least 0.999 for fp32); the check goes into onnx/export_info.json. onnx, onnxscript and onnxruntime are imported
only when exporting, so this module ships with the model code without them.
"""

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .modeling_medmoe import MedMoEModel
from .onnx_image_encoder import INFO_FILE, LEVEL_NAMES, ONNX_DIR, ROUTE_GRAPH, OnnxImageEncoder, expert_graph_name

OPSET = 18
FP32_COSINE_GOAL = 0.999
CHECK_IMAGES = 16


class ExportRefused(ValueError):
    """The folder cannot be exported; the message says why."""


class RouteGraph(nn.Module):
    """pixel_values -> the 4 pyramid levels and the image router's logits."""

    def __init__(self, model: MedMoEModel):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values: torch.Tensor):
        levels, router_logits = self.vision_model.route(pixel_values)
        return (*levels, router_logits)


class ExpertGraph(nn.Module):
    """The 4 levels of the images routed to one expert -> their image embeddings (the expert's local map, pooled
    and projected; the gate scale is 1 in value and left out)."""

    def __init__(self, model: MedMoEModel, index: int):
        super().__init__()
        self.expert = model.vision_model.experts.experts[index]
        self.projection = model.vision_model.image_projection
        self.grid_size = model.vision_model.local_grid_size

    def forward(self, level_0, level_1, level_2, level_3):
        local_map, _ = self.expert(level_0, level_1, level_2, level_3, grid_size=self.grid_size)
        return self.projection(local_map.flatten(2).mean(dim=2))


def load_model(folder: Path) -> MedMoEModel:
    """The folder's MedMoEModel, or ExportRefused saying why it cannot be exported."""
    if not (folder / "config.json").is_file():
        raise ExportRefused(f"{folder} is not a saved model folder (no config.json); an adapter folder needs merging.")
    try:
        model = MedMoEModel.from_pretrained(folder).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # RuntimeError: weights of another shape
        raise ExportRefused(f"{folder} does not load as a MedMoEModel: {error}") from error
    return model


def export_graph(module: nn.Module, inputs: tuple, path: Path, input_names, output_names) -> None:
    """One graph with a dynamic batch axis on every input, through torch.export (the TorchScript exporter does not
    trace timm's Swin exactly: its deeper levels came out different)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each stage
            torch.onnx.export(
                module, inputs, str(path), input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes={name: {0: batch} for name in input_names}, opset_version=OPSET, dynamo=True,
                external_data=False, verbose=False,
            )  # fmt: skip
    except Exception as error:  # the exporter raises many kinds: each means this graph cannot be exported
        reason = f"{type(error).__name__}: {error}"
        raise ExportRefused(f"torch.onnx.export could not export {path.name}: {reason}") from error


def quantize_graphs(directory: Path, names: list[str]) -> None:
    """Dynamic int8 quantisation of each graph's matrix products, in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in names:
        path = directory / name
        quantized = path.with_suffix(".int8.onnx")
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        quantized.replace(path)


def check_images(model: MedMoEModel, count: int = CHECK_IMAGES) -> torch.Tensor:
    """Images with varied content (noise at several contrasts and offsets) at the model's input size."""
    side = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(count, 3, side, side, generator=generator)
    contrast = torch.linspace(0.3, 2.0, count).view(count, 1, 1, 1)
    offset = torch.linspace(-1.0, 1.0, count).view(count, 1, 1, 1)
    return noise * contrast + offset


@torch.no_grad()
def compare(model: MedMoEModel, encoder: OnnxImageEncoder, pixel_values: torch.Tensor) -> dict:
    """How the export agrees with PyTorch on `pixel_values`."""
    eager = model.vision_model(pixel_values)
    exported, expert_index = encoder(pixel_values)
    cosine = torch.nn.functional.cosine_similarity(exported, eager.image_embeds, dim=-1)
    return {
        "images": len(pixel_values),
        "same_expert": float((expert_index == eager.expert_index).float().mean()),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
    }


def export_image_side(folder: Path, int8: bool = False) -> dict:
    """Write FOLDER/onnx/ (replacing an earlier export only once the new one is complete and checked); returns
    export_info.json's content."""
    model = load_model(folder)
    pixel_values = check_images(model)
    levels = model.vision_model.route(pixel_values[:2])[0]
    num_experts = model.config.num_experts
    names = [ROUTE_GRAPH] + [expert_graph_name(index) for index in range(num_experts)]
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        directory = Path(staging) / ONNX_DIR
        directory.mkdir()
        graphs = [(RouteGraph(model), (pixel_values[:2],), ("pixel_values",), (*LEVEL_NAMES, "router_logits"))]
        graphs += [(ExpertGraph(model, index), tuple(levels), LEVEL_NAMES, ("image_embeds",)) for index in
                   range(num_experts)]  # fmt: skip
        for name, (module, inputs, input_names, output_names) in zip(
            tqdm(names, desc="exporting", unit="graph"), graphs
        ):
            export_graph(module, inputs, directory / name, input_names, output_names)
        if int8:
            quantize_graphs(directory, names)
        info = {"precision": "int8" if int8 else "fp32", "opset": OPSET, "num_experts": num_experts}
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        info["check"] = compare(model, OnnxImageEncoder(Path(staging)), pixel_values)
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if not int8 and (info["check"]["min_cosine"] < FP32_COSINE_GOAL or info["check"]["same_expert"] < 1):
            raise ExportRefused(f"The fp32 export disagrees with PyTorch: {info['check']}; nothing was written.")
        shutil.rmtree(folder / ONNX_DIR, ignore_errors=True)
        directory.replace(folder / ONNX_DIR)
    return info
