"""The trainer against open_clip's: whole-batch accumulation, SigLIP, tower locks, checkpointing, spec checks."""

from __future__ import annotations

import contextlib

import pytest
import torch
from open_clip.loss import SigLipLoss

from core.errors import SpecError
from core.families import model_family
from core.losses import HelipLoss, SimCLRLoss
from core.models import load_model, prepare_for_training
from core.spec import TrainSpec, parse_spec
from core.train import plan_steps
from core.train_step import StepLoss, micro_slices, train_step

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TINY_SIGLIP = {**TINY, "init_logit_bias": -10.0}
GROUP = 4


def _model(siglip: bool = False):
    name = "helip-train-sigmoid" if siglip else "helip-train-tiny"
    loaded = load_model(name, config=TINY_SIGLIP if siglip else TINY)
    return loaded.model.double().train(), loaded.tokenizer


def _batch(n: int, tokenizer, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    texts = tokenizer([f"a photo of thing {i} {i % 3}" for i in range(n)])
    # groups of GROUP: a target and its 3 hard pairs
    idx = torch.arange(n) // GROUP
    mask = (idx[:, None] == idx[None, :]) & ~torch.eye(n, dtype=torch.bool)
    return images, texts, mask


def _grads(model, images, texts, mask, slices, *, siglip: bool, ssl: bool = False, per_slice_loss: bool = False):
    model.zero_grad(set_to_none=True)
    loss = StepLoss(HelipLoss(gamma=0.3, siglip=siglip), SimCLRLoss() if ssl else None, 0.5 if ssl else 0.0)
    if per_slice_loss:  # the old behaviour: a loss per micro-batch, each its own contrastive batch
        for sl in slices:
            train_step(model, images[sl], texts[sl], mask[sl, sl], [slice(None)], step_loss=loss, ssl=ssl,
                       autocast=contextlib.nullcontext, backward=lambda t: (t / len(slices)).backward())
    else:
        train_step(model, images, texts, mask, slices, step_loss=loss, ssl=ssl, autocast=contextlib.nullcontext,
                   backward=lambda t: t.backward())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("siglip", [False, True])
def test_accumulation_gives_the_gradient_of_the_whole_batch(siglip):
    model, tok = _model(siglip)
    images, texts, mask = _batch(16, tok)
    whole = _grads(model, images, texts, mask, [slice(0, 16)], siglip=siglip)
    slices = micro_slices(16, 4, GROUP)
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    accum = _grads(model, images, texts, mask, slices, siglip=siglip)
    assert whole.keys() == accum.keys() and "logit_scale" in whole
    assert ("logit_bias" in whole) == siglip
    for n in whole:
        torch.testing.assert_close(accum[n], whole[n], rtol=1e-7, atol=1e-10, msg=n)
    # The test can fail: a loss per micro-batch (4 contrastive batches of 4) is a different gradient.
    old = _grads(model, images, texts, mask, slices, siglip=siglip, per_slice_loss=True)
    assert max(float((old[n] - whole[n]).abs().max()) for n in whole) > 1e-4


def test_accumulation_with_the_simclr_term():
    model, tok = _model()
    images, texts, mask = _batch(8, tok)
    views = torch.stack([images, images.flip(-1), images.flip(-2)], dim=1)  # [B, 3, C, H, W]
    whole = _grads(model, views, texts, mask, [slice(0, 8)], siglip=False, ssl=True)
    accum = _grads(model, views, texts, mask, micro_slices(8, 2, GROUP), siglip=False, ssl=True)
    for n in whole:
        torch.testing.assert_close(accum[n], whole[n], rtol=1e-7, atol=1e-10, msg=n)


def test_siglip_loss_equals_open_clip_without_hard_pairs():
    model, tok = _model(siglip=True)
    images, texts, _ = _batch(12, tok, seed=1)
    with torch.no_grad():
        img, txt, scale, bias = model(images, texts)
    img, txt, scale, bias = (x.detach() for x in (img, txt, scale, bias))
    assert float(bias) == -10.0
    ours = HelipLoss(gamma=0.3, siglip=True)(img, txt, scale, None, logit_bias=bias)
    ref = SigLipLoss()(img, txt, scale, bias)
    assert float(ours["contrastive_loss"]) == pytest.approx(float(ref), rel=1e-12)
    assert float(ours["margin_loss"]) == 0.0
    # ... and it is not the softmax CLIP loss (the wrong loss would be caught)
    clip = HelipLoss(gamma=0.0)(img, txt, scale)["contrastive_loss"]
    assert abs(float(clip) - float(ref)) > 1e-3


def test_model_family_and_coca_refused_naming_model_name():
    assert model_family("ViT-B-32") == "clip"
    assert model_family("ViT-B-16-SigLIP") == "siglip"
    assert model_family("custom", TINY_SIGLIP) == "siglip"
    assert model_family("coca_ViT-B-32") == "coca"
    with pytest.raises(SpecError) as err:
        parse_spec({"model": {"name": "coca_ViT-B-32"}, "data": {"train": "x.csv"}})
    assert err.value.param == "model.name" and "CoCa" in str(err.value)
    coca_cfg = {**TINY, "multimodal_cfg": {"width": 32, "layers": 1}}
    with pytest.raises(SpecError) as err:
        parse_spec({"model": {"name": "mine", "config": coca_cfg}, "data": {"train": "x.csv"}})
    assert err.value.param == "model.name"


def _moved(before: dict, model) -> set[str]:
    return {n for n, p in model.state_dict().items() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("lock", ["image", "text", "text_ln_trainable"])
def test_locked_towers_do_not_move(lock):
    model, tok = _model()
    spec = TrainSpec(lock_image=lock == "image", lock_text=lock != "image",
                     lock_text_freeze_layer_norm=lock != "text_ln_trainable")
    notes = prepare_for_training(model, spec)
    assert notes and "locked" in notes[0]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    images, texts, mask = _batch(8, tok)
    for _ in range(2):
        _grads(model, images, texts, mask, [slice(0, 8)], siglip=False)
        opt.step()
    moved = _moved(before, model)
    visual = {n for n in before if n.startswith("visual.")}
    text = {n for n in before if not n.startswith("visual.") and n not in ("logit_scale",) and "attn_mask" not in n}
    if lock == "image":
        assert not moved & visual
        assert moved & text
    else:
        assert moved & visual
        text_ln = {n for n in text if ".ln_" in n or n.startswith("ln_final")}
        assert text_ln
        if lock == "text":
            assert not moved & text
        else:  # LayerNorms stay trainable, everything else of the tower is frozen
            assert moved & text == moved & text_ln and moved & text_ln


def test_gradient_checkpointing_gives_the_same_gradient():
    model, tok = _model()
    images, texts, mask = _batch(8, tok)
    plain = _grads(model, images, texts, mask, [slice(0, 8)], siglip=False)
    assert prepare_for_training(model, TrainSpec(grad_checkpointing=True)) == ["gradient checkpointing on"]
    assert model.transformer.grad_checkpointing
    ckpt = _grads(model, images, texts, mask, [slice(0, 8)], siglip=False)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-9, atol=1e-12, msg=n)


def test_open_clip_precision_names():
    base = {"model": {"name": "ViT-B-32"}, "data": {"train": "x.csv"}}
    for given, stored in [("amp", "fp16"), ("amp_bf16", "bf16"), ("amp_bfloat16", "bf16"),
                          ("pure_bf16", "pure_bf16"), ("fp32", "fp32")]:
        assert parse_spec({**base, "train": {"precision": given}}).train.precision == stored
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "train": {"precision": "fp8"}})
    assert err.value.param == "train.precision"


def test_warmup_longer_than_the_run_is_refused():
    base = {"model": {"name": "ViT-B-32"}, "data": {"train": "x.csv"}}
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "train": {"max_steps": 10, "warmup": 20}})
    assert err.value.param == "train.warmup" and "longer than the run" in str(err.value)
    parse_spec({**base, "train": {"max_steps": 10, "warmup": 10}})  # as long as the run: allowed
    # steps known only from the data: refused when the plan is made
    spec = parse_spec({**base, "train": {"epochs": 1, "batch_size": 8, "warmup": 50},
                       "helip": {"hard_per_target": 1, "sample_from": 10}, "mining": {"top_k": 10}})
    assert plan_steps(400, spec) == 100
    with pytest.raises(SpecError) as err:
        plan_steps(160, spec)  # 40 steps
    assert err.value.param == "train.warmup"


def test_api_refuses_at_submit_and_documents_the_new_fields(pg_url, redis_url, tmp_path):
    """Real HTTP handling (FastAPI app, Postgres, Redis): 422 naming the field, and the OpenAPI descriptions."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from helip import db
    from helip.settings import Settings

    db.upgrade(pg_url)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("filepath\ttitle\nimg0.png\ta red square\n")
    settings = Settings(_env_file=None, data_dir=tmp_path / "state", database_url=pg_url, broker_url=redis_url,
                        storage_url=(tmp_path / "state" / "store").as_uri(), allowed_data=str(tmp_path / "data"),
                        secret_key="test-secret", queue_name="helip-train-test")
    base = {"model": {"name": "tiny-api-train", "config": TINY}, "data": {"train": str(tmp_path / "data" / "train.tsv")}}
    bad = [({"model": {"name": "coca_ViT-B-32"}}, "model.name"),
           ({"train": {"max_steps": 5, "warmup": 6}}, "train.warmup"),
           ({"eval": {"zeroshot": [{"name": "z", "root": str(tmp_path / "data")}]}, "guard": {"objective": "q/acc1"}},
            "guard.objective")]
    with TestClient(create_app(settings)) as client:
        for over, param in bad:
            r = client.post("/jobs", json={**base, **over})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] == param, r.text
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
    guard = schemas["GuardSpec"]["properties"]
    assert all(guard[f].get("description") for f in ("wise_alphas", "objective", "protect"))
    assert schemas["EvalSpec"]["properties"]["every"]["description"]
    train = schemas["TrainSpec"]["properties"]
    for f in ("lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats", "lock_text",
              "lock_text_unlocked_layers", "lock_text_freeze_layer_norm", "grad_checkpointing", "precision",
              "accum_steps", "warmup"):
        assert train[f].get("description"), f


def test_a_tokenizer_that_needs_a_missing_package_is_a_model_error():
    import importlib.util

    from core.errors import ModelError

    if importlib.util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed here")
    with pytest.raises(ModelError) as err:  # open_clip picks SigLIP's T5 tokenizer for a name with "siglip"
        load_model("tiny-siglip-named", config=TINY_SIGLIP)
    assert err.value.param == "model.name" and "transformers" in str(err.value)
