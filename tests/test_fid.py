"""fid.py: the FID Inception against pytorch-fid (with pytorch-fid's preprocessing), the metrics
against closed forms and the ADM formulas, statistics files, input checks, and the CLI under
torchrun (random Inception weights: no download)."""

import json
import math
import urllib.error

import numpy as np
import pytest
import pytorch_fid.fid_score
import pytorch_fid.inception
import torch
import torch.nn as nn
from PIL import Image

import fid
from common import MissingWeightsError, UserError
from conftest import StubInception, run_torchrun
from data import DemoShapes


@pytest.fixture(scope="module")
def inception():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return fid.load_inception(random_weights=True, seed=0)


@pytest.fixture(scope="module")
def inception_pytorch_fid_preprocessing():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return fid.load_inception(random_weights=True, seed=0, preprocess="pytorch-fid")


@pytest.fixture(scope="module")
def pytorch_fid_inception(inception):
    """pytorch-fid's InceptionV3 (FID variant, pool features) holding our random weights: its weight
    download is replaced by handing it our state dict, which it loads with strict=True."""
    state = inception.state_dict()
    mp = pytest.MonkeyPatch()
    mp.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    try:
        full = pytorch_fid.inception.fid_inception_v3()  # torchvision Inception3 + the FID blocks
        wrapper = pytorch_fid.inception.InceptionV3([3], use_fid_inception=True).eval()
    finally:
        mp.undo()
    return full, wrapper


def random_uint8_images(n, h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# The network


def test_layout_equals_pytorch_fid_inception3(inception, pytorch_fid_inception):
    """Same parameter names, shapes and order as the Inception3 that pt_inception-2015-12-05 was
    saved from (566 entries, incl. fc), so the real file loads with strict=True both ways."""
    full, _ = pytorch_fid_inception
    ours, theirs = inception.state_dict(), full.state_dict()
    assert len(ours) == 566
    assert ([(k, v.shape, v.dtype) for k, v in ours.items()]
            == [(k, v.shape, v.dtype) for k, v in theirs.items()])
    fid.FIDInception().load_state_dict(theirs, strict=True)
    assert all(m.eps == 0.001 for m in inception.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.bias is None for m in inception.modules() if isinstance(m, nn.Conv2d))


def test_features_equal_pytorch_fid(inception_pytorch_fid_preprocessing, pytorch_fid_inception):
    """With --preprocess pytorch-fid, uint8 images through compute_activations give pytorch-fid's
    pool features for the same weights; logits = pool @ fc.weight^T (IS logits, no bias)."""
    inception = inception_pytorch_fid_preprocessing
    _, wrapper = pytorch_fid_inception
    images = random_uint8_images(2, 64, 80)
    feats, logits = fid.compute_activations(images, inception, batch_size=2, progress=False)
    with torch.no_grad():
        # as pytorch-fid's ToTensor
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255
        theirs = wrapper(x)[0].flatten(1).numpy()
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    assert feats.std(0).mean() > 0  # different images, different features (not a dead random net)
    np.testing.assert_allclose(feats, theirs, rtol=1e-5, atol=1e-5)
    w = inception.fc.weight.detach().numpy()
    np.testing.assert_allclose(logits, feats @ w.T, rtol=1e-4, atol=1e-4)


def test_load_inception_from_file_and_errors(inception, tmp_path, monkeypatch):
    path = tmp_path / "pt_inception.pth"
    torch.save(inception.state_dict(), path)
    model = fid.load_inception(ckpt=str(path))
    assert model.weights_name == "pt_inception.pth" and not model.training
    assert all(torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), inception.state_dict().values()))
    bad = {k: v for k, v in inception.state_dict().items() if k != "fc.bias"}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="is not pytorch-fid"):
        fid.load_inception(ckpt=str(tmp_path / "bad.pth"))
    # Offline, no cached file: the error names the file and the flag (no real download attempted).
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError, match="--inception_ckpt"):
        fid.load_inception()


# --------------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_stats(n, d, seed, scale=1.0):
    feats = np.random.default_rng(seed).normal(size=(n, d)) * scale
    return feats.mean(0), np.cov(feats, rowvar=False)


def test_frechet_equal_gaussians_is_zero():
    mu, sigma = gaussian_stats(400, 64, 0)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_refuses_non_finite_statistics():
    mu, sigma = gaussian_stats(400, 64, 0)
    sigma[3, 5] = np.nan  # NaN would otherwise come out as the "FID"
    with pytest.raises(UserError, match="NaN/inf"):
        fid.frechet_distance(mu, sigma, mu, gaussian_stats(400, 64, 1)[1])


def test_frechet_diagonal_closed_form():
    """Commuting (diagonal) covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2,
    including zero variances (rank-deficient)."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 3, 50), rng.uniform(0, 3, 50)
    a[:10] = 0.0
    b[5:15] = 0.0
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_keeps_small_genuine_variances():
    """Full rank but ill-conditioned (variances from 10 down to 1e-8), commuting: the closed form
    again. Small eigenvalues are real here, not round-off, and must not be dropped (that biases FID
    upwards)."""
    rng = np.random.default_rng(0)
    d = 256
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = np.logspace(1, -8, d)
    b = a * rng.uniform(0.5, 1.5, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fid.frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    assert got == pytest.approx(expected, abs=1e-6)
    assert fid.frechet_distance(np.zeros(d), s1, np.zeros(d), s1) == pytest.approx(0.0, abs=1e-6)


# pytorch-fid passes scipy's deprecated `disp`
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_frechet_matches_pytorch_fid_when_well_conditioned():
    mu1, s1 = gaussian_stats(500, 64, 2)
    mu2, s2 = gaussian_stats(500, 64, 3, scale=1.3)
    mu2 = mu2 + 0.1
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    theirs = pytorch_fid.fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(theirs, rel=1e-8)


def test_frechet_finite_on_rank_deficient_covariances():
    """10 samples in 256 dims (rank <= 9): finite, >= 0, symmetric, and 0 for identical
    statistics."""
    mu1, s1 = gaussian_stats(10, 256, 4)
    mu2, s2 = gaussian_stats(10, 256, 5)
    d12, d21 = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    assert np.isfinite(d12) and d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # 4 samples in 1024 dims: the square roots of ~1020 round-off eigenvalues must not add up to a
    # visible error. Equal covariances, means 1/32 apart in every dimension: FID = 1024 / 32^2 = 1
    # exactly.
    mu, s = gaussian_stats(4, 1024, 6, scale=3.0)
    assert fid.frechet_distance(mu, s, mu + 1 / 32, s) == pytest.approx(1.0, rel=1e-6)


def test_statistics_from_features():
    feats = np.random.default_rng(7).normal(size=(5000, 64)).astype(np.float32)  # > 1 chunk of 4096
    stats = fid.FIDStatistics.from_features(feats)
    np.testing.assert_allclose(stats.mu, feats.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64), rowvar=False),
                               atol=1e-10)
    with pytest.warns(UserWarning, match="rank-deficient"):
        fid.FIDStatistics.from_features(feats[:20])
    with pytest.raises(UserError, match="at least 2"):
        fid.FIDStatistics.from_features(feats[:1])
    feats[3, 3] = np.inf
    with pytest.raises(UserError, match="NaN/inf"):
        fid.FIDStatistics.from_features(feats)


# --------------------------------------------------------------------------------------------------
# Inception Score and precision/recall


def adm_inception_score(logits, split_size):
    """ADM evaluator's formula, written out in numpy (softmax, then consecutive parts)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i: i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score():
    assert fid.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0, abs=1e-12)
    # 8 equally frequent, confidently predicted classes: IS -> 8.
    confident = np.zeros((160, 1008))
    confident[np.arange(160), np.arange(160) % 8] = 60.0
    mean, std = fid.inception_score(confident)
    assert mean == pytest.approx(8.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    logits = np.random.default_rng(8).normal(size=(200, 1008)) * 3
    for split_size in (20, 30, 5000):  # 30: the last of 7 parts holds 20 samples, as in ADM's loop
        got = fid.inception_score(logits, split_size)[0]
        assert got == pytest.approx(adm_inception_score(logits, split_size), rel=1e-9)


def brute_force_precision_recall(real, fake, k):
    """The definition, with all distances at once (float64)."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # (real, fake)
    precision = (d <= radii(real)[:, None]).any(0).mean()
    recall = (d <= radii(fake)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(70, 16)).astype(np.float32)
    fake = (rng.normal(size=(55, 16)) * 0.7 + 0.4).astype(np.float32)
    got = fid.precision_recall(real, fake, k=3, batch_size=8, device="cpu")  # several row blocks
    expected = brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), 3)
    assert got == pytest.approx(expected)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert fid.precision_recall(real, real, device="cpu") == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100, device="cpu") == (0.0, 0.0)
    with pytest.raises(UserError, match="more than k=3 points"):
        fid.precision_recall(real[:3], fake, device="cpu")


# --------------------------------------------------------------------------------------------------
# Inputs, statistics files, extraction plumbing (stub network)


def test_npz_sources(tmp_path):
    images = random_uint8_images(5, 24, 32)
    np.savez(tmp_path / "stored.npz", arr_0=images, arr_1=np.arange(5))
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    for name in ("stored.npz", "compressed.npz"):
        src = fid.load_source(str(tmp_path / name))
        assert isinstance(src, fid.NpzImages) and len(src) == 5 and src.shape[1:3] == (24, 32)
        # Any contiguous share (a rank's), streamed in batches.
        for start, stop in ((0, 5), (1, 4), (3, 5), (2, 2)):
            batches = list(src.batches(2, start, stop)) or [images[:0]]
            assert np.array_equal(np.concatenate(batches), images[start:stop])
    # An ADM reference batch: its stored statistics, with its images beside them (for precision/
    # recall); with from_images (--reference_from_images), only its images.
    mu, sigma = np.arange(2048.0), np.diag(np.arange(1.0, 2049.0))
    np.savez(tmp_path / "adm_ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2023],
             sigma_s=sigma[:2023, :2023])
    stats = fid.load_source(str(tmp_path / "adm_ref.npz"))
    assert isinstance(stats, fid.FIDStatistics) and isinstance(stats.images, fid.NpzImages)
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma_s, sigma[:2023, :2023])
    assert stats.features is None and stats.num_images == -1
    assert stats.path == str(tmp_path / "adm_ref.npz")
    assert np.array_equal(np.concatenate(list(stats.images.batches(2, 0, 5))), images)
    notes = []
    src = fid.load_source(str(tmp_path / "adm_ref.npz"), log=notes.append, from_images=True)
    assert isinstance(src, fid.NpzImages) and "not using its stored mu/sigma" in notes[0]


def ragged_images():
    """What np.savez makes of a list of images of different sizes: an object array."""
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    return arr


@pytest.mark.parametrize("arrays,match", [
    ({"images": random_uint8_images(2)}, "expected 'arr_0'"),
    ({"arr_0": random_uint8_images(2).transpose(0, 3, 1, 2)}, "NHWC"),
    ({"arr_0": random_uint8_images(2).astype(np.float32) / 255}, "uint8"),
    ({"arr_0": ragged_images()}, "different sizes"),
    ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, "not finite statistics"),
    ({"mu": np.zeros(2048), "sigma": np.eye(64)}, r"\(2048,\) and sigma \(64, 64\) are not"),
])
def test_bad_npz_inputs(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=match):
        fid.load_source(str(path))


def test_missing_path_and_float_images(tmp_path):
    with pytest.raises(UserError, match="nope.npz .*No such file"):
        fid.load_source(str(tmp_path / "nope.npz"))
    with pytest.raises(UserError, match="to_uint8"):
        fid.compute_activations(torch.rand(2, 3, 8, 8), StubInception(), progress=False)


def test_statistics_file_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    features = rng.normal(size=(30, 2048)).astype(np.float32)
    stats = fid.FIDStatistics(rng.normal(size=2048), np.eye(2048) + 0.01, 30, features)
    stats.save(str(tmp_path / "s.npz"))
    back = fid.load_source(str(tmp_path / "s.npz"))
    assert isinstance(back, fid.FIDStatistics) and back.num_images == 30
    for name in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    # pytorch-fid's own statistics files (mu, sigma only) are read too.
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)
    back = fid.load_source(str(tmp_path / "pytorch_fid.npz"))
    assert back.features is None and back.num_images == -1
    assert np.array_equal(back.sigma, stats.sigma)
    # ADM's spatial statistics (mu_s, sigma_s) are read, and written back under the same keys.
    np.savez(tmp_path / "adm_stats.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu[:7],
             sigma_s=2 * np.eye(7))
    adm = fid.load_source(str(tmp_path / "adm_stats.npz"))
    adm.save(str(tmp_path / "adm_again.npz"))
    with np.load(tmp_path / "adm_again.npz") as again:
        assert np.array_equal(again["mu_s"], stats.mu[:7])
        assert np.array_equal(again["sigma_s"], 2 * np.eye(7))
    np.savez(tmp_path / "half.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu[:7])
    with pytest.raises(UserError, match="half.npz: mu_s .* and sigma_s missing"):
        fid.load_source(str(tmp_path / "half.npz"))


def test_activations_inputs_agree(tmp_path):
    """A numpy NHWC array, a torch NCHW tensor, an ADM .npz and a folder of PNGs give the same
    rows in the same order."""
    model = StubInception()
    images = random_uint8_images(7, 16, 16)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ref = fid.compute_activations(images, model, batch_size=3, progress=False)
    np.savez(tmp_path / "a.npz", arr_0=images)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    for other in (tensor, fid.load_source(str(tmp_path / "a.npz")),
                  fid.load_source(str(tmp_path), 16)):
        got = fid.compute_activations(other, model, batch_size=3, progress=False)
        # (float32 matmuls round differently for different batch sizes, hence the tolerance)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)


def test_a_folder_with_an_unreadable_file_is_reported(tmp_path):
    for i in range(3):
        Image.fromarray(random_uint8_images(1, 16, 16, seed=i)[0]).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"truncated")
    with pytest.warns(UserWarning) as caught:
        # no workers: their warnings would escape pytest
        pools, _ = fid.compute_activations(fid.load_source(str(tmp_path)), StubInception(),
                                           batch_size=2, num_workers=0, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("unreadable image" in m and "1.png" in m for m in messages)  # named when met
    assert any("1 unreadable files were replaced" in m for m in messages)  # counted at the end
    assert pools.shape[0] == 3


def test_extraction_stays_float32_under_a_callers_bf16_autocast():
    """A training script may call evaluate() inside its bf16 autocast, with TF32 on; features must
    not change."""
    model = StubInception()
    images = random_uint8_images(4, 16, 16)
    plain = fid.compute_activations(images, model, progress=False)[0]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with fid.exact_float32(torch.device("cpu")):
                assert not torch.backends.cuda.matmul.allow_tf32
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
            assert torch.backends.cuda.matmul.allow_tf32  # restored
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
            under_autocast = fid.compute_activations(images, model, progress=False)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    np.testing.assert_array_equal(under_autocast, plain)


def test_evaluate_with_saved_reference_statistics(tmp_path):
    model = StubInception()
    samples, reference = random_uint8_images(120, seed=1), random_uint8_images(160, seed=2)
    direct = fid.evaluate(samples, reference, model=model, prc=True,
                          save_stats=str(tmp_path / "ref.npz"), progress=False)
    reused = fid.evaluate(samples, str(tmp_path / "ref.npz"), model=model, prc=True, progress=False)
    assert direct["reference"] == "160 reference images featurised here"
    assert reused.pop("reference") == f"the stored statistics of {tmp_path / 'ref.npz'}"
    assert reused == {k: v for k, v in direct.items() if k != "reference"}
    nchw = torch.from_numpy(samples).permute(0, 3, 1, 2)
    as_tensor = fid.evaluate(nchw, str(tmp_path / "ref.npz"), model=model, prc=True,
                             progress=False)
    assert as_tensor["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert set(direct) >= {"fid", "inception_score", "precision", "recall", "num_samples",
                           "num_reference"}
    assert direct["inception_score_splits"] == 1  # ADM: parts of 5000
    assert direct["num_reference"] == 160
    # Without --prc the statistics file has no features, and asking for precision/recall says what
    # to do.
    stats = fid.load_source(str(tmp_path / "ref.npz"))
    no_features = str(tmp_path / "ref_nofeat.npz")
    fid.FIDStatistics(stats.mu, stats.sigma, stats.num_images).save(no_features)
    with pytest.raises(UserError, match="--prc --save_stats"):
        fid.evaluate(samples, no_features, model=model, prc=True, progress=False)


def test_cli_statistics_only_and_usage_errors(tmp_path, monkeypatch):
    """`fid.py PATH --save_stats OUT` writes statistics that evaluate() accepts for either side
    (stub net)."""
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: StubInception())
    np.savez(tmp_path / "a.npz", arr_0=random_uint8_images(100, 16, 16, seed=3))
    np.savez(tmp_path / "b.npz", arr_0=random_uint8_images(90, 16, 16, seed=4))
    for name in ("a", "b"):
        out = fid.main([str(tmp_path / f"{name}.npz"), "--save_stats",
                        str(tmp_path / f"{name}_stats.npz"), "--prc", "--device", "cpu",
                        "--json", str(tmp_path / f"{name}.json")])
        assert out["num_images"] == json.load(open(tmp_path / f"{name}.json"))["num_images"]
    from_stats = fid.evaluate(str(tmp_path / "a_stats.npz"), str(tmp_path / "b_stats.npz"),
                              model=StubInception(), prc=True, progress=False)
    from_images = fid.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                               model=StubInception(), prc=True, progress=False)
    assert "inception_score" not in from_stats  # statistics have no logits
    for key in ("fid", "precision", "recall", "num_samples", "num_reference"):
        assert from_stats[key] == from_images[key]

    with pytest.raises(SystemExit):
        fid.main([str(tmp_path)])  # one path without --save_stats
    np.savez(tmp_path / "wrong.npz", images=random_uint8_images(2))
    with pytest.raises(UserError, match="expected 'arr_0'"):
        fid.main([str(tmp_path / "wrong.npz"), str(tmp_path / "wrong.npz"), "--device", "cpu"])


# --------------------------------------------------------------------------------------------------
# The CLI with the random-weight Inception: 1 process vs torchrun with 2, and saved statistics


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_cli")
    DemoShapes(4, 48, num_classes=4, seed=1).save(str(root / "ref"))  # a folder, class subfolders
    demo = DemoShapes(4, 48, num_classes=4, seed=2)
    np.savez(root / "samples.npz", arr_0=np.stack([demo.render(i) for i in range(4)]))  # ADM layout
    return root


def test_cli_one_process_then_torchrun_on_saved_statistics(tiny_sets):
    """`fid.py samples.npz ref_folder --save_stats ref.npz` in one process, then the same samples
    against the written statistics under torchrun with 2 ranks: same FID, IS and
    precision/recall."""
    root = tiny_sets
    common_args = ["--random_inception", "--prc", "--batch_size", "4", "--num_workers", "0",
                   "--device", "cpu"]
    with pytest.warns(UserWarning) as caught:
        one = fid.main([str(root / "samples.npz"), str(root / "ref"), *common_args,
                        "--json", str(root / "one.json"),
                        "--save_stats", str(root / "ref_stats.npz")])
    said = " ".join(str(w.message) for w in caught)
    assert "RANDOM weights" in said and "4 images < 2048 feature dimensions" in said
    assert json.load(open(root / "one.json"))["fid"] == one["fid"]
    assert one["inception_weights"].startswith("RANDOM") and one["preprocess"] == "adm"
    assert one["num_samples"] == one["num_reference"] == 4
    assert np.isfinite(one["fid"]) and 0 <= one["precision"] <= 1 and one["inception_score"] >= 1

    run_torchrun(["fid.py", str(root / "samples.npz"), str(root / "ref_stats.npz"), *common_args,
                  "--json", str(root / "two.json")], nproc=2)
    two = json.load(open(root / "two.json"))
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-5)
    assert two["sfid"] == pytest.approx(one["sfid"], rel=1e-5) and one["sfid"] > 0
    assert (two["precision"], two["recall"]) == (one["precision"], one["recall"])
    assert two["inception_score"] == pytest.approx(one["inception_score"], rel=1e-5)
    assert two["num_reference"] == 4


# --------------------------------------------------------------------------------------------------
# Reconstruction metrics


def test_psnr_closed_form():
    from train_tokenizer import psnr

    a = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    b = a.clone()
    b[1] += 10  # MSE 100 -> 10 log10(255^2 / 100)
    out = psnr(a, b)
    assert out[0] == float("inf")
    assert abs(out[1].item() - 10 * math.log10(255 ** 2 / 100)) < 1e-9


def test_ssim_matches_an_independent_computation():
    from scipy.signal import convolve2d

    from train_tokenizer import ssim

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 24, 20), generator=g, dtype=torch.uint8)
    noise = torch.randint(-40, 41, a.shape, generator=g)
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    x = np.arange(11) - 5
    w = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w, w) / w.sum() ** 2

    def ref(img1, img2):  # per-channel SSIM, 'valid' Gaussian filtering, float64
        vals = []
        for c in range(3):
            p, q = img1[c].astype(np.float64), img2[c].astype(np.float64)
            f = lambda m: convolve2d(m, w, mode="valid")  # noqa: E731 (the window is symmetric)
            mp, mq = f(p), f(q)
            vp, vq, cpq = f(p * p) - mp ** 2, f(q * q) - mq ** 2, f(p * q) - mp * mq
            c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
            numerator = (2 * mp * mq + c1) * (2 * cpq + c2)
            denominator = (mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)
            vals.append((numerator / denominator).mean())
        return np.mean(vals)

    got = ssim(a, b)
    for i in range(2):
        assert abs(got[i].item() - ref(a[i].numpy(), b[i].numpy())) < 1e-10
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert ((got > 0) & (got < 0.99)).all()  # noisy copies: similar, not equal
