"""Tests for core.metrics and core.evaluate: hand-computed answers and slow reference loops."""

from __future__ import annotations

import random

import pytest
import torch

from core.metrics import linear_probe_metrics, retrieval_metrics, zeroshot_metrics

torch.set_num_threads(1)


# ---------------------------------------------------------------- zero-shot


def test_zeroshot_metrics_hand_case_unbalanced():
    # 6 classes, labels unbalanced: four samples of class 0, one of 1, one of 2.
    logits = torch.tensor([
        [5.0, 1, 1, 1, 1, 1],   # label 0: correct
        [5.0, 0, 0, 0, 0, 0],   # label 0: correct
        [5.0, 2, 0, 0, 0, 0],   # label 0: correct
        [0.0, 1, 2, 3, 4, 5],   # label 0: ranked 6th -> wrong, outside top 5
        [0.0, 4, 5, 0, 0, 0],   # label 1: ranked 2nd -> wrong at top 1, in top 5
        [0.0, 0, 9, 0, 0, 0],   # label 2: correct
    ])
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    m = zeroshot_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(4 / 6)
    assert m["acc5"] == pytest.approx(5 / 6)
    # per class recall: class 0 3/4, class 1 0/1, class 2 1/1; classes 3-5 absent from labels
    assert m["mean_per_class_recall"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert m["mean_per_class_recall"] != pytest.approx(m["acc1"])


def test_zeroshot_metrics_fewer_than_five_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 0, 2])
    m = zeroshot_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(2 / 3)
    assert m["acc5"] == 1.0  # top-min(5, 3): every label is in the top 3
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 1.0) / 2)


def test_zeroshot_metrics_rejects_bad_shapes():
    with pytest.raises(ValueError):
        zeroshot_metrics(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        zeroshot_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------- retrieval


def _slow_retrieval(img, txt, t2i, ks, captions_of_image=None, text_caps=None):
    """Double loop: rank every candidate for every query with Python sorting."""
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    n_i, n_t = img.shape[0], txt.shape[0]

    def positive(j, i):
        if t2i[j] == i:
            return True
        if text_caps is not None:
            return text_caps[j].strip() in {c.strip() for c in captions_of_image[i]}
        return False

    out = {}
    for k in ks:
        hits = 0
        for j in range(n_t):
            order = sorted(range(n_i), key=lambda i: -float(txt[j] @ img[i]))
            hits += any(positive(j, i) for i in order[:k])
        out[f"image_retrieval_recall@{k}"] = hits / n_t
        hits = 0
        for i in range(n_i):
            order = sorted(range(n_t), key=lambda j: -float(img[i] @ txt[j]))
            hits += any(positive(j, i) for j in order[:k])
        out[f"text_retrieval_recall@{k}"] = hits / n_i
    return out


def _hand_case():
    e = torch.eye(3)
    img = e.clone()
    txt = torch.stack([
        e[0],                 # t0 -> img0: rank 1
        e[1] + 0.5 * e[0],    # t1 -> img0: img1, img0 -> rank 2
        e[1] + 0.8 * e[2],    # t2 -> img1: rank 1
        e[2] + 0.5 * e[0],    # t3 -> img1: img2, img0, img1 -> rank 3
        e[2],                 # t4 -> img2: rank 1
        e[0] + 0.1 * e[2],    # t5 -> img2: img0, img2 -> rank 2
    ])
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    return img, txt, t2i


def test_retrieval_hand_case_two_captions_per_image():
    img, txt, t2i = _hand_case()
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2, 3))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 6)
    assert m["image_retrieval_recall@2"] == pytest.approx(5 / 6)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image queries: img0 -> t0 first (own); img1 -> t1 (img0's) then t2 (own); img2 -> t4 (own)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert m == pytest.approx(_slow_retrieval(img, txt, t2i, (1, 2, 3)))


def test_retrieval_matches_slow_loop_on_random_data():
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, d = 23, 57, 8
    img = torch.randn(n_img, d, generator=g)
    txt = torch.randn(n_txt, d, generator=g)
    # every image gets at least one text, the rest at random
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    ks = (1, 5, 10, 100)
    assert retrieval_metrics(img, txt, t2i, ks=ks) == pytest.approx(_slow_retrieval(img, txt, t2i, ks))
    # with captions drawn from a small vocabulary, so identical captions are frequent
    rng = random.Random(0)
    texts = [rng.choice(["a dog", "a cat ", " a cat", "a bird", "a car", "a tree"]) for _ in range(n_txt)]
    caps = [[] for _ in range(n_img)]
    for t, i in zip(texts, t2i.tolist(), strict=True):
        caps[i].append(t)
    got = retrieval_metrics(img, txt, t2i, texts=texts, ks=ks)
    assert got == pytest.approx(_slow_retrieval(img, txt, t2i, ks, caps, texts))
    assert retrieval_metrics(img, txt, t2i, texts=texts, image_captions=caps, ks=ks) == pytest.approx(got)


def test_retrieval_chunked_path_matches(monkeypatch):
    # Force tiny score blocks so the chunk loop runs many times.
    import core.metrics as cm

    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(17, 6, generator=g), torch.randn(40, 6, generator=g)
    t2i = torch.randint(0, 17, (40,), generator=g)
    whole = retrieval_metrics(img, txt, t2i)
    monkeypatch.setattr(cm, "_SCORE_BLOCK_ELEMENTS", 50)
    assert retrieval_metrics(img, txt, t2i) == pytest.approx(whole)


def test_retrieval_identical_caption_rule_changes_the_answer():
    e = torch.eye(3)
    img = torch.stack([e[0], e[1], e[2]])
    dog = torch.nn.functional.normalize(e[0] + 0.9 * e[1], dim=0)   # nearer img0 than img1
    txt = torch.stack([dog, dog, e[2], e[0]])
    t2i = torch.tensor([0, 1, 2, 2])
    texts = ["a dog", " a dog ", "a cat", "a bird"]  # t1's caption equals t0's after strip
    plain = retrieval_metrics(img, txt, t2i, ks=(1,))
    rule = retrieval_metrics(img, txt, t2i, texts=texts, ks=(1,))
    # t1 ("a dog", image 1) retrieves image 0 first: a miss, unless image 0's identical caption counts.
    # t3 ("a bird") also retrieves image 0: a miss either way (different caption).
    assert plain["image_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert rule["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    # image queries: image 1 (e1) has t0 and t1 tied first, both "a dog": a hit under the rule
    # whichever wins the tie; image 0 retrieves t3 ("a bird", image 2's): still a miss; image 2 hits.
    assert rule["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    # the same through image_captions in CLIP_benchmark's layout (texts image by image)
    order = torch.tensor([0, 1, 2, 3])
    caps = [["a dog"], [" a dog "], ["a cat", "a bird"]]
    assert retrieval_metrics(img, txt[order], t2i[order], image_captions=caps, ks=(1,)) == pytest.approx(rule)


def test_retrieval_rejects_inconsistent_inputs():
    img, txt, t2i = _hand_case()
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt, t2i[:-1])
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt, t2i, texts=["x"] * 5)
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 1, 2, 3]))


# ---------------------------------------------------------------- linear probe


def _gaussian_classes(n_per_class, n_classes, d, sep, gen):
    means = torch.zeros(n_classes, d)
    means[:, :n_classes] = torch.eye(n_classes) * sep
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = means[y] + torch.randn(len(y), d, generator=gen)
    return x, y


def test_linear_probe_separable_classes():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = _gaussian_classes(30, 4, 16, 6.0, g)
    xte, yte = _gaussian_classes(30, 4, 16, 6.0, g)
    # shift and scale features so that standardisation matters
    xtr, xte = xtr * 50 + 7, xte * 50 + 7
    m = linear_probe_metrics(xtr, ytr, xte, yte, epochs=50)
    assert set(m) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    assert m["lp_acc1"] >= 0.97
    assert m["lp_mean_per_class_recall"] >= 0.97
    assert m["lp_acc5"] == 1.0
    # deterministic with the seed
    assert linear_probe_metrics(xtr, ytr, xte, yte, epochs=50) == m


def test_linear_probe_random_labels_near_chance():
    g = torch.Generator().manual_seed(1)
    n_classes = 10
    xtr, xte = torch.randn(300, 32, generator=g), torch.randn(1000, 32, generator=g)
    ytr = torch.randint(0, n_classes, (300,), generator=g)
    yte = torch.randint(0, n_classes, (1000,), generator=g)
    m = linear_probe_metrics(xtr, ytr, xte, yte, epochs=50, weight_decay=1e-3)
    assert abs(m["lp_acc1"] - 1 / n_classes) < 0.05
    assert abs(m["lp_acc5"] - 5 / n_classes) < 0.07


# ---------------------------------------------------------------- evaluate() end to end

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import json

    import open_clip

    cfg_dir = tmp_path_factory.mktemp("cfg")
    (cfg_dir / "helip-eval-tiny.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg_dir / "helip-eval-tiny.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("helip-eval-tiny", pretrained=None)
    tokenizer = open_clip.get_tokenizer("helip-eval-tiny")
    # A random model predicts one class for everything, which would make the zero-shot checks
    # trivial. Fit the two projections for a moment (0.5 s) on red, green and blue, not yellow:
    # predictions then differ by image, and yellow stays mostly wrong.
    for p in model.parameters():
        p.requires_grad_(False)
    heads = [model.visual.proj, model.text_projection]
    for p in heads:
        p.requires_grad_(True)
    names = ["red", "green", "blue"]
    images = torch.stack([preprocess(_image(COLOURS[n], 5000 + 10 * c + k)) for c, n in enumerate(names) for k in range(8)])
    texts = tokenizer([f"a photo of a {n}." for n in names for _ in range(8)])
    opt = torch.optim.AdamW(heads, lr=1e-2)
    loss_fn = open_clip.ClipLoss()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randperm(len(images), generator=g)[:16]
        loss = loss_fn(*model(images[idx], texts[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, preprocess, tokenizer


def _image(colour, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype("uint8")
    return Image.fromarray(arr)


def _image_folder(root, per_class, seed=0, corrupt=False):
    """ImageFolder with unbalanced classes; optionally one unreadable file."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        if per_class[c] == 0:
            continue  # no folder: a test split may lack a class
        (root / name).mkdir(parents=True)
        for k in range(per_class[c]):
            _image(colour, seed + 100 * c + k).save(root / name / f"{k}.png")
    if corrupt:
        (root / "red" / "broken.png").write_bytes(b"this is not a png")
    return root


def _retrieval_csv(tmp_path):
    """6 images, 10 rows: three images with 2 captions, two captions shared by two images, one missing file."""
    img_dir = tmp_path / "ret_images"
    img_dir.mkdir()
    rows = []
    for k, (name, colour) in enumerate(list(COLOURS.items()) + [("red", COLOURS["red"]), ("blue", COLOURS["blue"])]):
        p = img_dir / f"img{k}.png"
        _image(colour, 1000 + k).save(p)
        rows.append((str(p), f"a {name} square"))
        if k < 3:
            rows.append((str(p), f"a photo of something {name} number {k}"))
    rows.append((str(img_dir / "missing.png"), "a picture that is not there"))
    csv = tmp_path / "val.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"{p}\t{t}\n" for p, t in rows))
    return csv, rows


class _ProgressReporter:
    def __init__(self):
        self.calls = []

    def progress(self, stage, done, total, values=None):
        self.calls.append((stage, done, total))


def test_evaluate_end_to_end(tmp_path, tiny_clip):
    from PIL import Image

    from core.evaluate import evaluate, zeroshot_classifier
    from core.io import Access
    from core.spec import EvalSpec, LinearProbeSpec, RetrievalSpec, ZeroShotSpec

    model, preprocess, tokenizer = tiny_clip
    zs_root = _image_folder(tmp_path / "zs", [5, 2, 3, 1], corrupt=True)
    lp_train = _image_folder(tmp_path / "lp_train", [6, 6, 6, 6], seed=10)
    # no "red" in the probe's test split: its folder indices differ from train's and are mapped by name
    lp_test = _image_folder(tmp_path / "lp_test", [0, 3, 3, 3], seed=20)
    csv, rows = _retrieval_csv(tmp_path)
    templates = ["a photo of a {c}.", "a {c} thing"]
    spec = EvalSpec(
        zeroshot=[ZeroShotSpec(name="colours", root=str(zs_root), templates=templates)],
        retrieval=[RetrievalSpec(name="val", data=str(csv))],
        linear_probe=[LinearProbeSpec(name="probe", train=str(lp_train), test=str(lp_test), epochs=30)],
    )
    model.train()
    model.visual.eval()  # a submodule in its own mode must get it back too
    rep = _ProgressReporter()
    res = evaluate(model, preprocess, tokenizer, spec, access=Access(), device="cpu", batch_size=4, reporter=rep)
    assert model.training and not model.visual.training
    assert set(res) == {"colours", "val", "probe"}

    zs = res["colours"]
    assert set(zs) == {"acc1", "acc5", "mean_per_class_recall", "n_samples", "n_bad"}
    assert (zs["n_samples"], zs["n_bad"]) == (11, 1)
    assert zs["acc5"] == 1.0  # 4 classes: top-4
    # Direct computation: encode each readable image on its own, per-template classifier by hand.
    model.eval()
    with torch.no_grad():
        feats, labels = [], []
        for c, name in enumerate(COLOURS):
            for p in sorted((zs_root / name).glob("[0-9]*.png")):
                x = preprocess(Image.open(p).convert("RGB"))[None]
                feats.append(torch.nn.functional.normalize(model.encode_image(x), dim=-1)[0])
                labels.append(c)
        cols = []
        for name in COLOURS:
            t = torch.nn.functional.normalize(model.encode_text(tokenizer([s.format(c=name) for s in templates])), dim=-1)
            cols.append(torch.nn.functional.normalize(t.mean(0), dim=0))
        pred = (torch.stack(feats) @ torch.stack(cols).T).argmax(1)
    manual_acc1 = (pred == torch.tensor(labels)).float().mean().item()
    assert len(set(pred.tolist())) > 1  # the model does discriminate: the comparison below means something
    assert zs["acc1"] == pytest.approx(manual_acc1)
    per_class = [(pred[torch.tensor(labels) == c] == c).float().mean().item() for c in range(4)]
    assert zs["mean_per_class_recall"] == pytest.approx(sum(per_class) / 4)
    w = zeroshot_classifier(model, tokenizer, list(COLOURS), templates, "cpu")
    assert w.shape == (32, 4) and torch.allclose(w, torch.stack(cols).T, atol=1e-5)

    val = res["val"]
    assert set(val) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} | {"n_samples", "n_bad"}
    assert (val["n_samples"], val["n_bad"]) == (len(rows) - 1, 1)
    assert all(0.0 <= val[k] <= 1.0 for k in val if "recall" in k)
    # 6 images and 8 captions: every query has its answer within the top 10
    assert val["image_retrieval_recall@10"] == 1.0 and val["text_retrieval_recall@10"] == 1.0
    assert val["image_retrieval_recall@1"] <= val["image_retrieval_recall@5"]
    # Reference: the same metric with images deduplicated by path, encoded one by one.
    paths = list(dict.fromkeys(p for p, _ in rows[:-1]))
    with torch.no_grad():
        img = torch.cat([model.encode_image(preprocess(Image.open(p).convert("RGB"))[None]) for p in paths])
        txt = model.encode_text(tokenizer([t for _, t in rows[:-1]]))
    t2i = torch.tensor([paths.index(p) for p, _ in rows[:-1]])
    ref = retrieval_metrics(img, txt, t2i, texts=[t for _, t in rows[:-1]])
    assert {k: val[k] for k in ref} == pytest.approx(ref, abs=1e-6)

    lp = res["probe"]
    assert set(lp) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "n_samples", "n_bad"}
    assert (lp["n_samples"], lp["n_bad"]) == (33, 0)
    # colours are trivially separable even for random features
    assert lp["lp_acc1"] >= 0.9

    assert rep.calls and all(s == "evaluating" for s, _, _ in rep.calls)
    # 12 listed zero-shot files (one broken), 6 distinct readable retrieval images (the missing file is
    # known bad from the index), 24 + 9 probe images
    assert rep.calls[-1][1] == rep.calls[-1][2] == 12 + 6 + 33


def test_evaluate_spec_errors_name_the_field(tmp_path, tiny_clip):
    from core.errors import SpecError
    from core.evaluate import evaluate
    from core.io import Access
    from core.spec import EvalSpec, ZeroShotSpec

    model, preprocess, tokenizer = tiny_clip
    root = _image_folder(tmp_path / "zs", [1, 1, 1, 1])
    cases = [
        (ZeroShotSpec(name="a", root=str(root), classnames=["x", "y"]), "eval.zeroshot.0.classnames"),
        (ZeroShotSpec(name="a", root=str(root), templates=["a photo"]), "eval.zeroshot.0.templates"),
    ]
    for z, param in cases:
        with pytest.raises(SpecError) as info:
            evaluate(model, preprocess, tokenizer, EvalSpec(zeroshot=[z]), access=Access(), device="cpu")
        assert info.value.param == param
    # classnames from the spec replace folder names in the prompts: a different classifier, same keys
    z = ZeroShotSpec(name="a", root=str(root), classnames=["crimson", "lime", "navy", "gold"])
    res = evaluate(model, preprocess, tokenizer, EvalSpec(zeroshot=[z]), access=Access(), device="cpu")
    assert res["a"]["n_samples"] == 4 and 0.0 <= res["a"]["acc1"] <= 1.0
