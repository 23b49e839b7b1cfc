"""The ONNX export of the image side (training/export.py): it agrees with PyTorch and keeps the routing, int8 stays
close, a folder holding it still loads in PyTorch alone, medmoe-index and the evaluation run on it and say so, and an
export that cannot be done is refused clearly."""

import json
import shutil

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from medmoe.training import export  # noqa: E402
from modeling_medmoe import MedMoEModel  # noqa: E402
from modeling_medmoe.onnx_image_encoder import OnnxImageEncoder, has_onnx_export  # noqa: E402

from .test_archive import run_index  # noqa: E402


def varied_images(count: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise images [count, 3, 64, 64] from dark to bright, their brightness in 6 bands [count])."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, count).view(count, 1, 1, 1)
    offset = torch.linspace(-2, 2, count)
    images = torch.randn(count, 3, 64, 64, generator=generator) * scale + offset.view(-1, 1, 1, 1)
    return images, ((offset + 2) / 4 * 6).long().clamp(max=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, nano_folder):
    """The nano model with its image router taught to tell the images' brightness bands apart (an untrained router's
    logits differ by hundredths, which int8 rounding flips; a trained router's margins are wide), saved with an fp32
    export, and a copy with an int8 one."""
    torch.manual_seed(0)
    model = MedMoEModel.from_pretrained(nano_folder).train()
    router = model.vision_model.image_router
    optimizer = torch.optim.AdamW(router.parameters(), lr=1e-2)
    images, bands = varied_images(96, seed=2)
    with torch.no_grad():
        pooled = model.vision_model.vision_pyramid(images)[-1].mean(dim=(2, 3))
    for _ in range(200):
        torch.nn.functional.cross_entropy(router(pooled), bands).backward()
        optimizer.step()
        optimizer.zero_grad()
    fp32 = tmp_path_factory.mktemp("exported") / "fp32"
    shutil.copytree(nano_folder, fp32)
    model.save_pretrained(fp32)
    int8 = fp32.parent / "int8"
    shutil.copytree(fp32, int8)
    export.main(["--model", str(fp32)])
    export.main(["--model", str(int8), "--int8"])
    return fp32, int8


def against_pytorch(folder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the export's experts, PyTorch's experts, cosine of the two embeddings) on `varied_images`."""
    model = MedMoEModel.from_pretrained(folder).eval()
    pixels, _ = varied_images()
    with torch.no_grad():
        eager = model.vision_model(pixels)
    embeddings, experts = OnnxImageEncoder(folder)(pixels)
    return experts, eager.expert_index, torch.nn.functional.cosine_similarity(embeddings, eager.image_embeds, dim=-1)


def test_the_fp32_export_agrees_with_pytorch_and_keeps_the_routing(exported):
    experts, eager_experts, cosine = against_pytorch(exported[0])
    assert torch.equal(experts, eager_experts)
    assert len(experts.unique()) > 1, "the images must exercise several experts"
    assert cosine.min() >= 0.999
    info = json.loads((exported[0] / "onnx" / "export_info.json").read_text())
    assert info["precision"] == "fp32" and info["check"]["same_expert"] == 1.0


def test_int8_stays_close_to_pytorch(exported):
    experts, eager_experts, cosine = against_pytorch(exported[1])
    assert cosine.mean() >= 0.99 and (experts == eager_experts).float().mean() >= 0.9  # measured: 0.993, 1.0
    assert OnnxImageEncoder(exported[1]).precision == "int8"


def test_a_folder_with_an_export_still_loads_in_pytorch_alone(exported):
    from transformers import AutoModel

    folder, _ = exported
    assert has_onnx_export(folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert model(pixel_values=varied_images(2)[0]).image_embeds.shape == (2, model.config.projection_dim)


def test_the_export_is_refused_clearly(tmp_path, nano_folder):
    with pytest.raises(SystemExit, match="not a saved model folder"):
        export.main(["--model", str(tmp_path)])
    broken = tmp_path / "broken"
    shutil.copytree(nano_folder, broken)
    (broken / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SystemExit, match="does not load as a MedMoEModel"):
        export.main(["--model", str(broken)])
    assert not (broken / "onnx").exists()
    with pytest.raises(FileNotFoundError, match="holds no ONNX export"):
        OnnxImageEncoder(nano_folder)


def test_medmoe_index_and_the_evaluation_run_on_the_export(exported, image_folder, tmp_path):
    from medmoe.training import run_evaluation

    folder, _ = exported
    on_onnx = run_index(["--model", str(folder), "--images", str(image_folder), "--output_dir", str(tmp_path / "o")])
    on_torch = run_index(["--model", str(folder), "--images", str(image_folder), "--output_dir", str(tmp_path / "t"),
                          "--backend", "torch"])  # fmt: skip
    assert (on_onnx["backend"], on_torch["backend"]) == ("onnx-fp32", "torch")
    assert on_onnx["rows"] == on_torch["rows"]
    arguments = [
        "--model",
        str(folder),
        "--tasks",
        "zero_shot,retrieval",
        "--max_eval_samples",
        "32",
        "--num_workers",
        "0",
    ]
    figures = {
        backend: run_evaluation.main([*arguments, "--output_dir", str(tmp_path / backend), "--backend", backend])
        for backend in ("torch", "onnx")
    }
    for name, value in figures["torch"]["metrics"].items():
        assert figures["onnx"]["metrics"][name] == pytest.approx(value, abs=1e-3), name
    with pytest.raises(SystemExit):
        run_evaluation.parse_args([*arguments, "--output_dir", str(tmp_path), "--backend", "onnx", "--tasks",
                                   "attention"])  # fmt: skip


def test_the_handler_and_the_pipeline_use_the_export_and_say_so(exported, tmp_path):
    from transformers import pipeline

    from benchmarks.hostile_inputs import png_bytes

    from .helpers import endpoint_handler

    folder = tmp_path / "release"
    shutil.copytree(exported[0], folder)
    shutil.copyfile("model_card/handler.py", folder / "handler.py")
    request = {
        "inputs": [png_bytes(side=64, seed=seed) for seed in range(3)],
        "parameters": {"mode": "image-embedding"},
    }
    on_onnx = endpoint_handler(folder)(request)
    shutil.rmtree(folder / "onnx")
    on_torch = endpoint_handler(folder)(request)
    assert (on_onnx["backend"], on_torch["backend"]) == ("onnx-fp32", "torch")
    assert on_onnx["experts"] == on_torch["experts"]
    assert torch.tensor(on_onnx["embeddings"]) == pytest.approx(torch.tensor(on_torch["embeddings"]), abs=1e-4)
    classifier = pipeline("zero-shot-image-classification", model=str(exported[0]), trust_remote_code=True)
    scores = classifier(png_bytes(side=64), candidate_labels=["CT", "MRI"])
    assert classifier.image_encoder.name == "onnx-fp32" and sum(entry["score"] for entry in scores) == pytest.approx(
        1.0
    )
