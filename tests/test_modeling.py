"""MedMoEModel behaviour: sparse dispatch, router gradients, routing modes, checkpointing, dtype."""

import pytest
import torch
import torch.nn.functional as F

from modeling_medmoe import MedMoEForImageClassification, MedMoEModel


def count_expert_calls(model):
    calls = [0] * len(model.vision_model.experts.experts)
    samples = [0] * len(model.vision_model.experts.experts)
    for index, expert in enumerate(model.vision_model.experts.experts):

        def hook(module, args, index=index):
            calls[index] += 1
            samples[index] += args[0][0].shape[0]

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
    from training.loop import build_optimizer

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
