# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""The image side of a MedMoE folder on ONNX Runtime, with the sparse routing kept: one graph runs the vision
pyramid and the router, one graph per expert runs that expert and the image projection, and each image goes
through its chosen expert only, as in PyTorch.

    FOLDER/onnx/route.onnx        pixel_values [B, 3, H, W] -> level_0..level_3, router_logits [B, K]
    FOLDER/onnx/expert_K.onnx     level_0..level_3 of the images routed to K -> image_embeds [n, P]
    FOLDER/onnx/export_info.json  precision (fp32 or int8), opset, the check against PyTorch at export time

`python -m medmoe.training.export --model FOLDER` writes them. onnxruntime is imported only when an encoder is
built, so a folder with `onnx/` still loads in PyTorch alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ONNX_DIR = "onnx"
ROUTE_GRAPH = "route.onnx"
INFO_FILE = "export_info.json"
LEVEL_NAMES = ("level_0", "level_1", "level_2", "level_3")


def expert_graph_name(index: int) -> str:
    return f"expert_{index}.onnx"


def has_onnx_export(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ONNX_DIR / INFO_FILE).is_file()


def exported_encoder(folder: str | os.PathLike) -> "OnnxImageEncoder | None":
    """The folder's ONNX image encoder when it holds an export and onnxruntime is installed, else None (run the
    image side in PyTorch)."""
    import importlib.util

    if not has_onnx_export(folder) or importlib.util.find_spec("onnxruntime") is None:
        return None
    return OnnxImageEncoder(folder)


class OnnxImageEncoder:
    """pixel_values [B, 3, H, W] -> (image embeddings [B, P], not normalised, as `get_image_features`; the chosen
    expert [B]), on ONNX Runtime's CPU provider."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError('The ONNX backend needs onnxruntime: pip install "medmoe[onnx]".') from error
        directory = Path(folder) / ONNX_DIR
        info_path = directory / INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{folder} holds no ONNX export ({ONNX_DIR}/{INFO_FILE}); run training/export.py.")
        self.info = json.loads(info_path.read_text())
        options = onnxruntime.SessionOptions()
        # one graph runs at a time: threads that spin after their run would take the cores from the next graph's
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]

        def session(name: str):
            return onnxruntime.InferenceSession(str(directory / name), options, providers=providers)

        self.route = session(ROUTE_GRAPH)
        self.experts = [session(expert_graph_name(index)) for index in range(self.info["num_experts"])]

    @property
    def precision(self) -> str:
        return self.info["precision"]

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixel_values.detach().float().cpu().numpy()
        *levels, router_logits = self.route.run(None, {"pixel_values": pixels})
        expert_index = torch.from_numpy(router_logits).argmax(dim=-1)
        embeddings = None
        for index in expert_index.unique().tolist():
            rows = (expert_index == index).nonzero().squeeze(1).numpy()
            feeds = {name: level[rows] for name, level in zip(LEVEL_NAMES, levels)}
            (group,) = self.experts[index].run(None, feeds)
            if embeddings is None:
                embeddings = torch.empty(len(pixels), group.shape[1])
            embeddings[torch.from_numpy(rows)] = torch.from_numpy(group)
        return embeddings, expert_index
