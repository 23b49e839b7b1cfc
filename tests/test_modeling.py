"""MedMoEModel behaviour: sparse dispatch, router gradients, routing modes, checkpointing, dtype, and what a user of
transformers relies on (initialisation of missing weights, attention selection, return_dict, hidden states, the
main input, token embeddings, torch.export)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from modeling_medmoe import MedMoEForImageClassification, MedMoEModel


def count_expert_calls(model):
    calls = [0] * len(model.vision_model.experts.experts)
    samples = [0] * len(model.vision_model.experts.experts)
    for index, expert in enumerate(model.vision_model.experts.experts):

        def hook(module, args, index=index):
            calls[index] += 1
            samples[index] += args[0].shape[0]

        expert.register_forward_pre_hook(hook)
    return calls, samples


def test_forward_returns_the_documented_outputs(model, batch):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    out = model(**batch, return_loss=True, report_type_labels=labels)
    batch_size, projection = 8, model.config.projection_dim
    grid = model.vision_model.local_grid_size
    assert out.logits_per_image.shape == (batch_size, batch_size)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    assert out.image_embeds.shape == out.text_embeds.shape == (batch_size, projection)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(batch_size))
    assert out.region_embeds.shape == (batch_size, grid[0] * grid[1], projection)
    assert out.local_map.shape == (batch_size, model.config.vision_config.expert_dim, *grid)
    assert out.scale_attention.shape == (batch_size, 4, *grid)
    torch.testing.assert_close(out.scale_attention.sum(dim=1), torch.ones(batch_size, *grid))
    assert out.router_logits.shape == out.text_router_logits.shape == (batch_size, model.config.num_experts)
    assert out.word_region_attention.shape[:1] == (batch_size,) and out.word_region_attention.shape[2:] == grid
    for part in ("global_loss", "local_loss", "report_type_loss", "router_loss"):
        assert torch.isfinite(getattr(out, part)), part
    expected = out.global_loss + out.local_loss + out.report_type_loss + out.router_loss
    torch.testing.assert_close(out.loss, expected)


def test_only_the_chosen_expert_runs(model, batch):
    calls, samples = count_expert_calls(model)
    forced = torch.tensor([2, 2, 5, 2, 5, 5, 2, 2])
    out = model(pixel_values=batch["pixel_values"], expert_index=forced)
    assert calls == [0, 0, 1, 0, 0, 1]
    assert samples == [0, 0, 5, 0, 0, 3]
    assert out.expert_index.tolist() == forced.tolist()


def test_dispatch_keeps_each_sample_with_its_own_expert(model, batch):
    """A mixed batch gives each image the same output as running it alone through its expert."""
    model.eval()
    forced = torch.tensor([3, 0, 3, 1, 0, 5, 1, 3])
    mixed = model.get_image_features(pixel_values=batch["pixel_values"], expert_index=forced).pooler_output
    for row in (0, 3, 5):
        alone = model.get_image_features(
            pixel_values=batch["pixel_values"][row : row + 1], expert_index=forced[row : row + 1]
        )
        torch.testing.assert_close(mixed[row], alone.pooler_output[0], atol=1e-5, rtol=1e-4)


def router_gradients(model, batch, **weights) -> list[torch.Tensor]:
    """The image and text routers' gradients after one backward pass with these config weights (eval mode: no
    dropout, so passes differ only by the weights)."""
    model.eval()
    for name, value in weights.items():
        setattr(model.config, name, value)
    model.zero_grad()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    model(**batch, return_loss=True, report_type_labels=labels).loss.backward()
    routers = (*model.vision_model.image_router.parameters(), *model.text_router.parameters())
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in routers]


def test_what_trains_the_routers(model, batch):
    """The global loss gives the image router almost no gradient (the image embedding is L2-normalised, blind to the
    gate scale); the local loss gives it one through the scale; the report-type cross-entropies train both routers
    (the text router from nothing else)."""
    off = {"router_loss_weight": 0.0, "report_type_loss_weight": 0.0}
    global_only = router_gradients(model, batch, local_loss_weight=0.0, **off)
    assert max(gradient.abs().max() for gradient in global_only) < 1e-5
    with_local = router_gradients(model, batch, local_loss_weight=1.0, **off)
    assert max(gradient.abs().max() for gradient in with_local[:4]) > 1e-3
    assert all(gradient.abs().sum() == 0 for gradient in with_local[4:])
    on = {"router_loss_weight": 1.0, "report_type_loss_weight": 1.0}
    supervised = router_gradients(model, batch, local_loss_weight=0.0, global_loss_weight=1.0, **on)
    alone = router_gradients(model, batch, local_loss_weight=0.0, global_loss_weight=0.0, **on)
    assert min(gradient.abs().max() for gradient in supervised) > 1e-3
    for with_global, without in zip(supervised, alone):  # the global loss adds nothing measurable
        torch.testing.assert_close(with_global, without, atol=1e-5, rtol=0)


def test_forcing_an_expert_the_router_rules_out_stays_finite(model, batch):
    """A router logit gap of 1000 underflows the forced expert's probability to 0; outputs and gradients stay
    finite."""
    route_to(model.vision_model.image_router, 0, logit=1000.0)
    out = model(**batch, expert_index=torch.full((8,), 3), return_loss=True)
    assert out.expert_index.tolist() == [3] * 8
    out.loss.backward()
    assert torch.isfinite(out.image_embeds).all() and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def route_to(router, expert, logit=10.0):
    """Make a router MLP choose `expert` whatever its (non-negative after ReLU) input."""
    with torch.no_grad():
        for parameter in router.parameters():
            parameter.zero_()
        router[-1].bias[expert] = logit


@pytest.mark.parametrize(
    "router_input, training, expected",
    [
        ("image", True, 1),
        ("image", False, 1),
        ("text", True, 4),
        ("text", False, 1),
        ("text_teacher", True, 4),
        ("text_teacher", False, 1),
    ],
)
def test_routing_follows_the_configured_router(nano_config, batch, router_input, training, expected):
    config = nano_config.__class__.from_dict({**nano_config.to_dict(), "router_input": router_input})
    model = MedMoEModel(config).train(training)
    route_to(model.vision_model.image_router, 1)
    route_to(model.text_router, 4)
    out = model(**batch)
    assert out.expert_index.tolist() == [expected] * 8


@pytest.mark.parametrize("router_input", ["text", "text_teacher"])
def test_text_routed_configs_route_images_alone_by_the_image_router(nano_config, batch, router_input):
    """No report at inference: images alone, images with prompts, and explicit experts all work."""
    config = nano_config.__class__.from_dict({**nano_config.to_dict(), "router_input": router_input})
    model = MedMoEModel(config).eval()
    route_to(model.vision_model.image_router, 1)
    route_to(model.text_router, 4)
    assert model(pixel_values=batch["pixel_values"]).expert_index.tolist() == [1] * 8
    prompts = {key: batch[key][:3] for key in ("input_ids", "attention_mask")}
    assert model(pixel_values=batch["pixel_values"], **prompts).expert_index.tolist() == [1] * 8
    forced = model.get_image_features(pixel_values=batch["pixel_values"], expert_index=torch.full((8,), 2))
    alone = model.get_image_features(pixel_values=batch["pixel_values"][:1], expert_index=torch.tensor([2]))
    torch.testing.assert_close(forced.pooler_output[:1], alone.pooler_output, atol=1e-5, rtol=1e-4)


def test_text_routed_config_trains_the_image_router_on_the_report_type(nano_config, batch):
    config = nano_config.__class__.from_dict({**nano_config.to_dict(), "router_input": "text"})
    model = MedMoEModel(config).train()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    out = model(**batch, return_loss=True, report_type_labels=labels)
    expected = F.cross_entropy(out.router_logits[:6].float(), labels[:6])
    torch.testing.assert_close(out.router_loss, expected)


def test_a_router_reading_every_level_routes_by_all_four(nano_config, batch, tmp_path):
    config = nano_config.__class__.from_dict(nano_config.to_dict())
    config.vision_config.router_levels = "all"
    torch.manual_seed(0)
    model = MedMoEModel(config).eval()
    vision = model.vision_model
    levels, router_logits = vision.route(batch["pixel_values"])
    pooled = torch.cat([level.mean(dim=(2, 3)) for level in levels], dim=1)
    assert pooled.shape[1] == sum(vision.vision_pyramid.channels)
    torch.testing.assert_close(router_logits, vision.image_router(pooled))
    model.save_pretrained(tmp_path)
    reloaded = MedMoEModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded.vision_model.route(batch["pixel_values"])[1], router_logits)


def test_image_classifier_works_with_a_text_routed_config(nano_config, batch):
    labels = {"id2label": {0: "CT", 1: "MRI", 2: "X-ray"}, "label2id": {"CT": 0, "MRI": 1, "X-ray": 2}}
    config = nano_config.__class__.from_dict({**nano_config.to_dict(), "router_input": "text", **labels})
    model = MedMoEForImageClassification(config)
    out = model(pixel_values=batch["pixel_values"], labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    out.loss.backward()
    assert out.logits.shape == (8, 3) and torch.isfinite(out.loss)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model, batch):
    """In training mode (dropout and stochastic depth on): the recomputation replays the same random draws."""
    model.train()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    results = []
    for enable in (False, True):
        model.zero_grad()
        if enable:
            model.activation_checkpointing_enable()
        assert model.vision_model.vision_pyramid.gradient_checkpointing is enable
        assert all(expert.gradient_checkpointing is enable for expert in model.vision_model.experts.experts)
        assert model.text_tower.encoder.encoder.layer[0].gradient_checkpointing is enable
        torch.manual_seed(3)
        out = model(**batch, return_loss=True, report_type_labels=labels)
        out.loss.backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]
        results.append((out.loss.detach(), gradients))
    torch.testing.assert_close(results[0], results[1])


def test_loads_in_bfloat16(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MedMoEModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.vision_model.image_projection.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = loaded(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()})
    assert out.logits_per_image.dtype == torch.bfloat16
    assert torch.isfinite(out.logits_per_image.float()).all()


def test_dense_dispatch_gives_the_same_outputs_and_gradients_as_sparse(nano_config, batch):
    """The authors' dense mode (all experts run, one kept) is the reference for the sparse dispatch."""
    results = []
    for dispatch in ("sparse", "dense"):
        config = nano_config.__class__.from_dict(nano_config.to_dict())
        config.vision_config.expert_dispatch = dispatch
        torch.manual_seed(0)
        model = MedMoEModel(config).eval()
        out = model(**batch, return_loss=True, report_type_labels=torch.tensor([0, 1, 2, 3, 4, 5, -100, -100]))
        out.loss.backward()
        results.append(
            (out.loss.detach(), out.image_embeds.detach(), model.vision_model.image_router[0].weight.grad.clone())
        )
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_compiled_towers_give_the_eager_loss_and_gradients(model, batch):
    """`compile_towers` (pretraining's and evaluation's --torch_compile) changes speed only (eval mode: no dropout)."""
    model.eval()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -100, -100])
    names = [name for name, _ in model.named_parameters()]
    results = []
    for compiled in (False, True):
        model.zero_grad()
        if compiled:
            model.compile_towers()
        out = model(**batch, return_loss=True, report_type_labels=labels)
        out.loss.backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]
        results.append((out.loss.detach(), gradients))
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_an_idle_expert_is_unchanged_by_a_one_process_step(model, batch):
    """In one process an expert that no image of the batch chose gets no gradient, so AdamW (weight decay, momentum)
    leaves it as it is; the zero-valued use that hands idle experts a gradient is for several processes only
    (FSDP2 must reduce the same gradients everywhere; tests/test_distributed.py covers that case)."""
    from medmoe.training.loop import build_optimizer

    optimizer = build_optimizer(model, learning_rate=1e-2, weight_decay=0.5)
    chosen = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # experts 2-5 stay idle
    used = model.vision_model.experts.experts[0].projections[0][0].weight
    used_before = used.detach().clone()
    for _ in range(2):  # the second step would move them by momentum as well
        before = [parameter.detach().clone() for parameter in model.vision_model.experts.experts[3].parameters()]
        out = model(**batch, expert_index=chosen, return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = list(model.vision_model.experts.experts[3].parameters())
        assert all(torch.equal(old, new) for old, new in zip(before, after))
    assert not torch.equal(used_before, used)  # the chosen experts trained


def test_a_checkpoint_missing_tensors_loads_them_initialised_as_at_construction(model, batch, tmp_path):
    """Whatever a checkpoint lacks (backbone, expert, router, head or text tensors) is initialised by the model's own
    scheme (no uninitialised memory), and the loading report names it."""
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    missing = {
        "vision_model.vision_pyramid.backbone.patch_embed.proj.weight",
        "vision_model.vision_pyramid.backbone.layers_0.blocks.0.attn.qkv.weight",
        "vision_model.vision_pyramid.backbone.layers_0.blocks.0.attn.relative_position_bias_table",
        "vision_model.vision_pyramid.backbone.layers_0.blocks.0.norm1.weight",
        "vision_model.experts.experts.0.projections.0.0.weight",
        "vision_model.image_router.0.weight",
        "text_projection.weight",
        "text_tower.encoder.encoder.layer.0.attention.self.query.weight",
        "logit_scale",
    }
    on_disk = {key.removeprefix("vision_model.") for key in missing}  # saves keep the names folders have on disk
    assert on_disk <= set(state)
    save_file({key: value for key, value in state.items() if key not in on_disk}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    loaded, info = MedMoEModel.from_pretrained(tmp_path, output_loading_info=True)
    assert missing <= set(info["missing_keys"])
    parameters = dict(loaded.named_parameters())
    for key in missing:
        assert torch.isfinite(parameters[key]).all(), key
    block = "vision_model.vision_pyramid.backbone.layers_0.blocks.0"
    for key in (f"{block}.attn.qkv.weight", f"{block}.attn.relative_position_bias_table", "text_projection.weight"):
        assert 0.01 < parameters[key].std() < 0.03, key  # trunc_normal / normal with std 0.02
    assert torch.equal(parameters[f"{block}.norm1.weight"], torch.ones_like(parameters[f"{block}.norm1.weight"]))
    assert parameters["logit_scale"].item() == pytest.approx(model.config.logit_scale_init_value)
    kept = "experts.experts.1.projections.0.0.weight"
    assert torch.equal(parameters[f"vision_model.{kept}"], state[kept])  # loaded weights are left alone
    with torch.no_grad():
        assert torch.isfinite(loaded(**batch).logits_per_image).all()


def test_the_attention_implementation_reaches_the_text_encoder(nano_folder, batch):
    default = MedMoEModel.from_pretrained(nano_folder).eval()
    eager = MedMoEModel.from_pretrained(nano_folder, attn_implementation="eager").eval()
    assert default.text_tower.encoder.config._attn_implementation == "sdpa"
    assert eager.text_tower.encoder.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits_per_image, default(**batch).logits_per_image, atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
    default.set_attn_implementation("eager")
    assert default.text_tower.encoder.config._attn_implementation == "eager"


def test_return_dict_false_gives_tuples(model, batch, monkeypatch):
    monkeypatch.setattr(model.config, "return_dict", False)  # the config is the session's: restored after
    model.eval()
    with torch.no_grad():
        assert isinstance(model(**batch), tuple)
        assert isinstance(model.get_image_features(pixel_values=batch["pixel_values"]), tuple)
        assert isinstance(model.get_text_features(input_ids=batch["input_ids"]), tuple)
        assert isinstance(model(**batch, return_dict=True).logits_per_image, torch.Tensor)


def test_hidden_states_and_attentions_of_both_towers(model, batch):
    """Text: the encoder's hidden states and attentions; image: the 4 pyramid levels (strides 4 to 32) and the
    chosen expert's fused map."""
    model.eval().set_attn_implementation("eager")
    side = model.config.vision_config.image_size
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_hidden_states=True, output_attentions=True)  # fmt: skip
        out = model(**batch, output_hidden_states=True)
    levels, fused = image.hidden_states[:4], image.hidden_states[4]
    assert [level.shape[-1] for level in levels] == [side // 4, side // 8, side // 16, side // 32]
    assert fused.shape == (8, model.config.vision_config.expert_dim, *model.vision_model.local_grid_size)
    layers = model.config.text_config.num_hidden_layers
    assert len(text.hidden_states) == layers + 1 and len(text.attentions) == layers
    assert len(out.text_model_output.hidden_states) == layers + 1 and len(out.vision_model_output.hidden_states) == 5
    torch.testing.assert_close(out.vision_model_output.pooler_output, image.pooler_output)
    assert model.get_image_features(pixel_values=batch["pixel_values"]).hidden_states is None


def test_a_model_called_with_one_tensor_reads_token_ids(model, batch):
    """As CLIPModel: the main input is the token ids (Trainer counts tokens from it); the classifier's is pixels."""
    assert MedMoEModel.main_input_name == "input_ids"
    assert MedMoEForImageClassification.main_input_name == "pixel_values"
    with torch.no_grad():
        out = model.eval()(batch["input_ids"])
    assert out.text_embeds.shape[0] == 8 and out.image_embeds is None


def test_token_embeddings_grow_for_a_hospitals_new_words(model, batch):
    vocabulary = model.config.text_config.vocab_size
    model.resize_token_embeddings(vocabulary + 5)
    assert model.get_input_embeddings().num_embeddings == vocabulary + 5 == model.config.text_config.vocab_size
    input_ids = batch["input_ids"].clone()
    input_ids[:, 1] = vocabulary + 3
    with torch.no_grad():
        out = model.eval()(input_ids=input_ids, attention_mask=batch["attention_mask"])
    assert torch.isfinite(out.text_embeds).all()


def test_image_and_text_features_export_with_torch_export(model, batch):
    """While exporting, the experts run dense (group sizes depend on the data); the numbers are the sparse path's."""
    model.eval()

    class ImageFeatures(torch.nn.Module):
        def forward(self, pixel_values):
            return model.get_image_features(pixel_values=pixel_values).pooler_output

    class TextFeatures(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    pixel_values, text = batch["pixel_values"], (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        expected_image, expected_text = ImageFeatures()(pixel_values), TextFeatures()(*text)
        exported_image = torch.export.export(ImageFeatures(), (pixel_values,)).module()
        exported_text = torch.export.export(TextFeatures(), text).module()
        torch.testing.assert_close(exported_image(pixel_values), expected_image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(exported_text(*text), expected_text, atol=1e-5, rtol=1e-4)
    assert model.vision_model.experts.dispatch == "sparse"
