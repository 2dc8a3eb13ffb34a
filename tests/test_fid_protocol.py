"""fid.py's ADM evaluation protocol: the preprocessing (TF1's resize against TensorFlow's own
output, the scaling, no mixing of two preprocessings), sFID's features (which Inception tensor,
which channels, in what order), the statistics over chunks and ranks, a reference batch's stored
statistics, the resumable whole-set statistics, ADM's folder crop, and bad input (random Inception
weights)."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid
import inception as inception_module
from common import DistEnv, UserError
from conftest import ROOT, StubInception, run_script
from test_fid import brute_force_precision_recall, random_uint8_images


@pytest.fixture(scope="module")
def inception():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return fid.load_inception(random_weights=True, seed=0)


# --------------------------------------------------------------------------------------------------
# The ADM protocol: sFID features, statistics, the reference batch, whole-set statistics, bad input


def test_spatial_features_are_mixed_6d_branch1x1_in_tf_order(inception):
    """sFID's features: TF's mixed_6/conv (Mixed_6d's 1x1 branch after BN + ReLU), channels 0..6,
    flattened per image in NHWC order; taken in the same pass, the pool features unchanged."""
    images = random_uint8_images(2, 64, 80, seed=3)
    caught = []
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, out: caught.append(out.clone())
    )
    try:
        pool, logits, spatial = fid.compute_activations(
            images, inception, batch_size=2, progress=False, spatial=True
        )
    finally:
        hook.remove()
    branch = caught[0].numpy()  # (2, 192, 17, 17), the branch's own output
    expected = np.stack(
        [
            [[branch[b, c, h, w] for h in range(17) for w in range(17) for c in range(7)]]
            for b in range(2)
        ]
    ).reshape(2, -1)  # (h, w, c) order, written out
    assert spatial.shape == (2, 2023) and branch.min() >= 0  # after the ReLU
    np.testing.assert_array_equal(spatial, expected)
    plain = fid.compute_activations(images, inception, batch_size=2, progress=False)
    np.testing.assert_array_equal(plain[0], pool)
    np.testing.assert_array_equal(plain[1], logits)


def test_moments_merged_over_chunks_and_ranks_equal_numpy():
    rng = np.random.default_rng(11)
    x = (
        rng.normal(size=(103, 9)) * rng.uniform(0.1, 5, 9) + 40
    )  # a large mean: cancellation would show
    a, b = fid.Moments(9), fid.Moments(9)
    for lo, hi in ((0, 1), (1, 30), (30, 50)):
        a.add(torch.from_numpy(x[lo:hi]))
    b.add(torch.from_numpy(x[50:]))
    a.merge(b.count, b.mean, b.scatter)  # as rank 0 merges another rank's saved moments
    stats = fid.FIDStatistics.from_moments(a)
    assert stats.num_images == 103
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-11)


def stub_features(images):
    """The stub network's (pool, logits, spatial) of uint8 NHWC images (as floats 0..255)."""
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        return [t.numpy() for t in StubInception()(x, spatial=True)]


def test_reference_batch_stored_statistics_and_the_flag(tmp_path):
    """ADM's reference batch: FID/sFID against its stored statistics, precision/recall against its
    images; --reference_from_images: everything against its images."""
    samples, ref_images, whole = (
        random_uint8_images(n, 16, 16, seed=s) for n, s in ((100, 1), (90, 2), (300, 3))
    )
    pool, _, spatial = stub_features(
        whole
    )  # the stored "whole-set" statistics: another, larger set
    stored = dict(
        mu=pool.mean(0),
        sigma=np.cov(pool, rowvar=False),
        mu_s=spatial.mean(0),
        sigma_s=np.cov(spatial, rowvar=False),
    )
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, **stored)
    fake, ref = stub_features(samples), stub_features(ref_images)

    def fd(a, b):  # FID of feature rows `a` against stats (mu, sigma) or rows `b`
        b = b if isinstance(b, tuple) else (b.mean(0), np.cov(b, rowvar=False))
        return fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), *b)

    got = fid.evaluate(
        samples, str(tmp_path / "ref.npz"), model=StubInception(), prc=True, progress=False
    )
    assert got["fid"] == pytest.approx(fd(fake[0], (stored["mu"], stored["sigma"])), rel=1e-5)
    assert got["sfid"] == pytest.approx(fd(fake[2], (stored["mu_s"], stored["sigma_s"])), rel=1e-5)
    assert (got["precision"], got["recall"]) == pytest.approx(
        brute_force_precision_recall(ref[0], fake[0], 3)
    )
    assert got["reference"] == f"the stored statistics of {tmp_path / 'ref.npz'}"
    assert got["num_reference"] is None and got["num_prc_reference"] == 90
    assert "(100 samples vs the stored statistics of" in fid.result_line(got)
    flag = fid.evaluate(
        samples,
        str(tmp_path / "ref.npz"),
        model=StubInception(),
        prc=True,
        progress=False,
        reference_from_images=True,
    )
    assert flag["fid"] == pytest.approx(fd(fake[0], ref[0]), rel=1e-5)
    assert flag["sfid"] == pytest.approx(fd(fake[2], ref[2]), rel=1e-5)
    assert flag["reference"] == "90 reference images featurised here" and flag[
        "fid"
    ] != pytest.approx(got["fid"])
    assert (flag["precision"], flag["recall"]) == (got["precision"], got["recall"])


def test_bad_statistics_are_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: StubInception())
    np.savez(tmp_path / "s.npz", arr_0=random_uint8_images(20, 16, 16))
    d, ds = 64, 12
    np.savez(tmp_path / "only_pool.npz", mu=np.zeros(d), sigma=np.eye(d))
    np.savez(
        tmp_path / "wide.npz",
        mu=np.zeros(2048),
        sigma=np.eye(2048),
        mu_s=np.zeros(ds),
        sigma_s=np.eye(ds),
    )
    np.savez(
        tmp_path / "stats.npz",
        mu=np.zeros(d),
        sigma=np.eye(d),
        mu_s=np.zeros(ds),
        sigma_s=np.eye(ds),
    )
    cases = [
        (
            "only_pool.npz",
            [],
            r"only_pool.npz has no spatial statistics \(mu_s, sigma_s\) for sFID",
        ),
        (
            "wide.npz",
            [],
            "wide.npz: its mu has 2048 dimensions but this run's Inception pool features have 64",
        ),
        ("stats.npz", ["--prc"], "stats.npz has only mu/sigma"),
    ]
    monkeypatch.setattr(
        fid, "compute_activations", lambda *a, **k: pytest.fail("features computed first")
    )
    for name, flags, match in cases:
        with pytest.raises(UserError, match=match):
            fid.main([str(tmp_path / "s.npz"), str(tmp_path / name), "--device", "cpu", *flags])
    # The command line: one line on stderr, exit status 2, no traceback.
    proc = run_script(
        [
            "fid.py",
            str(tmp_path / "s.npz"),
            str(tmp_path / "only_pool.npz"),
            "--device",
            "cpu",
            "--random_inception",
        ]
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert (
        proc.returncode == 2
        and "Traceback" not in proc.stderr
        and len(lines) == 1
        and "only_pool.npz" in lines[0]
    )


def test_no_output_overwrites_an_input_and_inputs_are_checked_first(tmp_path, monkeypatch):
    monkeypatch.setattr(
        fid, "load_inception", lambda *a, **k: pytest.fail("network loaded before the checks")
    )
    for name in ("s.npz", "r.npz"):
        np.savez(tmp_path / name, arr_0=random_uint8_images(4, 16, 16))
    before = (tmp_path / "r.npz").read_bytes()
    (tmp_path / "link.npz").symlink_to(tmp_path / "s.npz")
    s, r = str(tmp_path / "s.npz"), str(tmp_path / "r.npz")
    for argv, match in [
        ([s, r, "--save_stats", r], f"--save_stats {r} is the input {r}"),
        ([s, r, "--json", str(tmp_path / "link.npz")], f"is the input {s}"),
        ([s, str(tmp_path / "nope")], "nope .*No such file"),
    ]:
        with pytest.raises(UserError, match=match):
            fid.main([*argv, "--device", "cpu"])
    assert (tmp_path / "r.npz").read_bytes() == before


def test_whole_set_statistics_resume_after_a_kill(tmp_path, monkeypatch):
    """`fid.py FOLDER --save_stats OUT` keeps running sums, not features: killed midway, a second
    run continues from the saved sums (the finished images are not featurised again) and gives
    np.cov's statistics of all the images; per-rank sums merge into the same statistics."""
    images = random_uint8_images(22, 16, 16, seed=5)
    np.savez(tmp_path / "set.npz", arr_0=images)
    out, seen = str(tmp_path / "stats.npz"), []

    class Counted(StubInception):
        def forward(self, x, spatial=False):
            seen.append(len(x))
            if kill_after and len(seen) > kill_after:
                raise KeyboardInterrupt
            return super().forward(x, spatial)

    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: Counted())
    argv = [
        str(tmp_path / "set.npz"),
        "--save_stats",
        out,
        "--batch_size",
        "3",
        "--save_every",
        "5",
        "--device",
        "cpu",
    ]
    kill_after = 4
    with pytest.raises(KeyboardInterrupt):
        fid.main(argv)
    assert (
        not os.path.exists(out) and sum(seen) == 15
    )  # 4 batches done, sums saved after 2 (6 images) and 4 (12)
    seen.clear()
    kill_after = 0
    fid.main(argv)
    assert sum(seen) == 22 - 12 and not os.path.exists(out + ".partial")
    pool, _, spatial = stub_features(images)
    with np.load(out) as z:
        assert (
            set(z.files) == {"mu", "sigma", "mu_s", "sigma_s", "num_images", "preprocess"}
            and int(z["num_images"]) == 22
        )
        for key, want in (
            ("mu", pool.mean(0)),
            ("sigma", np.cov(pool, rowvar=False)),
            ("mu_s", spatial.mean(0)),
            ("sigma_s", np.cov(spatial, rowvar=False)),
        ):
            # float32 features (of inputs 0..255), batched: round-off relative to the largest entry
            np.testing.assert_allclose(z[key], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # Two ranks (rank 1 first, as if it finished first): the merged statistics are the same.
    source = fid.load_source(str(tmp_path / "set.npz"))
    out2 = str(tmp_path / "stats2.npz")
    for rank in (1, 0):
        fid.dataset_statistics(
            source, StubInception(), DistEnv(rank, rank, 2, torch.device("cpu")), out2, 4
        )
    with np.load(out) as one, np.load(out2) as two:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(
                two[key], one[key], rtol=1e-4, atol=1e-6 * np.abs(one[key]).max()
            )


@pytest.mark.parametrize("wh", [(300, 257), (257, 391), (97, 61), (61, 100), (45, 32), (33, 40)])
def test_folder_preprocessing_is_adms_crop(tmp_path, wh):
    """A folder's images reach the network as ADM crops them (box halving, bicubic, centre crop):
    non-square both ways, odd (5, 19, 13, 7 px) and even (16, 20 px) margins, halvings and none."""
    from test_data import reference_adm_crop

    img = Image.fromarray(random_uint8_images(1, wh[1], wh[0], seed=sum(wh))[0])
    img.save(tmp_path / "a.png")
    source = fid.load_source(str(tmp_path), image_size=32)
    np.testing.assert_array_equal(
        source[0][0].permute(1, 2, 0).numpy(), reference_adm_crop(img, 32)
    )


# --------------------------------------------------------------------------------------------------
# ADM's preprocessing: TF1's resize, the scaling, and no FID across two preprocessings


def test_resize_is_tensorflows_and_pytorchs_is_not():
    """TF1's ResizeBilinear (align_corners False, no half-pixel centres) against TensorFlow's own
    output for upsampling, downsampling and one axis unchanged: equal to float32 round-off.
    PyTorch's bilinear (half-pixel centres: pytorch-fid's, and this code's before) is far off."""
    ref = np.load(os.path.join(ROOT, "tests", "reference", "tf_resize_bilinear.npz"))
    for case in ("up", "down", "tall"):
        x = torch.from_numpy(ref[f"{case}_in"]).permute(0, 3, 1, 2).float()  # uint8 NHWC -> NCHW
        want = ref[f"{case}_out"]  # float32 NHWC
        got = inception_module.tf1_resize_bilinear(x, want.shape[1:3]).permute(0, 2, 3, 1)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=255 * 2.0**-22)
        old = F.interpolate(x, want.shape[1:3], mode="bilinear", align_corners=False)
        assert np.abs(old.permute(0, 2, 3, 1).numpy() - want).max() > 1, case


@pytest.mark.parametrize("preprocess", ["adm", "pytorch-fid"])
def test_network_input_scaling(inception, preprocess):
    """The first convolution sees ADM's (x - 128) / 128 (pytorch-fid's 2 x / 255 - 1) of the uint8
    values; 299x299 images are not resized by either."""
    images = random_uint8_images(2, 299, 299, seed=7)
    seen = []
    hook = inception.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    inception.preprocess = preprocess
    try:
        fid.compute_activations(images, inception, progress=False)
    finally:
        hook.remove()
        inception.preprocess = "adm"
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    want = (x - 128) / 128 if preprocess == "adm" else 2 * x / 255 - 1
    np.testing.assert_allclose(seen[0].double().numpy(), want.numpy(), rtol=0, atol=1e-6)


def stub_loader(*args, preprocess="adm", **kwargs):
    """load_inception for the CLI tests: the stub network, preprocessing recorded."""
    stub = StubInception()
    stub.preprocess = preprocess
    return stub


def test_statistics_record_their_preprocessing_and_mixing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", stub_loader)
    np.savez(tmp_path / "s.npz", arr_0=random_uint8_images(20, 16, 16, seed=1))
    np.savez(tmp_path / "r.npz", arr_0=random_uint8_images(20, 16, 16, seed=2))
    s, r, cpu = str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), ["--device", "cpu"]
    for how, extra in (("pytorch-fid", []), ("adm", []), ("pytorch-fid", ["--prc"])):
        out = str(tmp_path / f"r_{how}{''.join(extra)}.npz")
        fid.main([r, "--save_stats", out, "--preprocess", how, *extra, *cpu])
        with np.load(out) as z:
            assert str(z["preprocess"]) == how
    result = fid.main([s, str(tmp_path / "r_pytorch-fid.npz"), "--preprocess", "pytorch-fid", *cpu])
    assert result["preprocess"] == "pytorch-fid" and "pytorch-fid preprocessing)" in (
        fid.result_line(result))
    assert fid.main([s, r, *cpu])["preprocess"] == "adm"
    with pytest.raises(UserError, match="r_pytorch-fid.npz holds statistics of pytorch-fid "
                       "preprocessing, this run uses adm"):
        fid.main([s, str(tmp_path / "r_pytorch-fid.npz"), *cpu])
    with pytest.raises(UserError, match="r_adm.npz holds statistics of adm preprocessing"):
        fid.main([str(tmp_path / "r_pytorch-fid--prc.npz"), str(tmp_path / "r_adm.npz"),
                  "--preprocess", "pytorch-fid", *cpu])
    # A file without the key: an ADM reference batch (mu_s, no num_images) counts as ADM's; this
    # project's files from before the key (num_images) and pytorch-fid's (mu, sigma) as theirs.
    with np.load(tmp_path / "r_adm.npz") as z:
        keys = {k: z[k] for k in z.files if k != "preprocess"}
    files = {"adm_batch": ({k: v for k, v in keys.items() if k != "num_images"}, "adm"),
             "ours_before": (keys, "pytorch-fid"),
             "pytorch_fid": ({"mu": keys["mu"], "sigma": keys["sigma"]}, "pytorch-fid")}
    for name, (arrays, how) in files.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        assert fid.load_source(str(tmp_path / f"{name}.npz")).preprocess == how, name
    with pytest.raises(UserError, match="adm_batch.npz holds statistics of adm preprocessing"):
        fid.main([s, str(tmp_path / "adm_batch.npz"), "--preprocess", "pytorch-fid", *cpu])
    with pytest.raises(UserError, match="ours_before.npz holds statistics of pytorch-fid"):
        fid.main([s, str(tmp_path / "ours_before.npz"), "--no_sfid", *cpu])
    # The statistics themselves refuse too (callers that do not go through evaluate).
    a, b = (fid.load_source(str(tmp_path / f"r_{how}.npz")) for how in ("adm", "pytorch-fid"))
    with pytest.raises(UserError, match="an FID across the two would be meaningless"):
        a.frechet_distance(b)
    # The command line: one line, exit status 2.
    proc = run_script(["fid.py", s, str(tmp_path / "r_pytorch-fid.npz"), "--random_inception",
                       *cpu])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(lines) == 1 and "pytorch-fid" in lines[0], proc.stderr


def test_partial_statistics_resume_only_on_the_same_input(tmp_path, monkeypatch):
    """--save_stats' partial sums record their input (path, count, crop, preprocessing): a killed
    run on folder A is not continued on folder B with as many images, nor at another crop size."""
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(random_uint8_images(9, 20, 20, seed=seed)):
            Image.fromarray(image).save(tmp_path / folder / f"{i}.png")
    calls = []

    class Killed(StubInception):
        def forward(self, x, spatial=False):
            calls.append(len(x))
            if len(calls) > 2:  # after the first partial save (3 images)
                raise KeyboardInterrupt
            return super().forward(x, spatial)

    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: Killed())
    out = str(tmp_path / "stats.npz")
    args = ["--save_stats", out, "--save_every", "3", "--batch_size", "3", "--num_workers", "0",
            "--device", "cpu"]
    with pytest.raises(KeyboardInterrupt):
        fid.main([str(tmp_path / "a"), "--image_size", "16", *args])
    assert os.listdir(out + ".partial")
    monkeypatch.setattr(fid, "load_inception", stub_loader)
    for other, match in ((["b", "--image_size", "16"], "/b .9 images, crop 16"),
                         (["a", "--image_size", "8"], "/a .9 images, crop 8"),
                         (["a", "--image_size", "16", "--preprocess", "pytorch-fid"], "pytorch")):
        with pytest.raises(UserError, match=f"holds a partial pass over .*/a .9 images, crop 16, "
                           f"adm preprocessing.*, not over .*{match}"):
            fid.main([str(tmp_path / other[0]), *other[1:], *args])
    assert fid.main([str(tmp_path / "a"), "--image_size", "16", *args])["num_images"] == 9


# --------------------------------------------------------------------------------------------------
# FD_DINOv2 (a random one-block DINOv2: no download)


@pytest.mark.parametrize("hw", [(256, 256), (32, 32), (300, 257)])
def test_dinov2_input_is_dgm_evals_transform(hw):
    """PIL's antialiased bicubic resize of the uint8 image straight to 224x224, /255, ImageNet
    mean/std: by hand here, and dgm-eval's own torchvision transform (exactly)."""
    import torchvision.transforms as T
    images = random_uint8_images(2, *hw, seed=7)
    got = fid.dinov2_input(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for a, x in zip(images, got):
        pil = np.asarray(Image.fromarray(a).resize((224, 224), Image.BICUBIC)) / 255.0
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), (pil - mean) / std, atol=1e-5)
        dgm_eval = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                              T.Normalize(mean, std)])(Image.fromarray(a))
        assert torch.equal(x, dgm_eval.float())


def test_dinov2_features_are_the_cls_token_after_the_final_norm():
    net = fid.load_dinov2(random_weights=True)
    normed = []
    net.norm.register_forward_hook(lambda m, i, out: normed.append(out))
    images = random_uint8_images(5, 40, 40, seed=8)
    *_, feats = fid.compute_activations(images, StubInception(), dinov2=net, batch_size=3,
                                        progress=False)
    assert feats.shape == (5, 384)
    cls = torch.cat([n[:, 0] for n in normed])  # the hub model's x_norm_clstoken
    np.testing.assert_allclose(feats, cls.numpy(), rtol=1e-6, atol=1e-6)
    x = fid.dinov2_input(torch.from_numpy(images[:2]).permute(0, 3, 1, 2))
    assert torch.equal(net(x), normed[-1][:, 1:])  # the tokenizer's patch tokens, as before


def test_fd_dinov2_end_to_end(tmp_path, monkeypatch, capsys):
    """fid.py --fd_dinov2: finite and positive between two sets, 0 for a set and itself, the same
    from saved statistics (both passes) and from a reference batch's images; refusals first."""
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: StubInception())
    a, b, s, s2 = (str(tmp_path / n) for n in ("a.npz", "b.npz", "s.npz", "s2.npz"))
    np.savez(a, arr_0=random_uint8_images(12, 32, 32, seed=1))
    np.savez(b, arr_0=random_uint8_images(10, 48, 48, seed=2))
    flags = ["--fd_dinov2", "--random_dinov2", "--device", "cpu", "--num_workers", "0"]
    with pytest.warns(UserWarning, match="feature dimensions"):
        got = fid.main([a, b, *flags, "--save_stats", s, "--json", str(tmp_path / "r.json")])
        assert 0 < got["fd_dinov2"] < np.inf and "FD_DINOv2" in capsys.readouterr().out
        assert got["dinov2_weights"].startswith("RANDOM")
        assert fid.main([a, a, *flags])["fd_dinov2"] == pytest.approx(0, abs=1e-6)
        assert fid.main([a, s, *flags])["fd_dinov2"] == pytest.approx(got["fd_dinov2"], rel=1e-6)
        fid.main([b, *flags, "--save_stats", s2])  # the resumable whole-set pass
        with np.load(s) as one, np.load(s2) as two:
            assert one["mu_dinov2"].shape == (384,)
            np.testing.assert_allclose(one["sigma_dinov2"], two["sigma_dinov2"], atol=1e-6)
        # ADM's reference batch: statistics (here without DINOv2's) and images.
        stats = fid.load_source(s)
        batch = str(tmp_path / "batch.npz")
        np.savez(batch, arr_0=np.load(b)["arr_0"], mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s,
                 sigma_s=stats.sigma_s)
        assert fid.main([a, batch, *flags, "--no_sfid"])["fd_dinov2"] == pytest.approx(
            got["fd_dinov2"], rel=1e-6)
    nodino = str(tmp_path / "nodino.npz")
    fid.FIDStatistics(stats.mu, stats.sigma, 10, mu_s=stats.mu_s, sigma_s=stats.sigma_s).save(
        nodino)
    wide = str(tmp_path / "wide.npz")
    fid.FIDStatistics(stats.mu, stats.sigma, 10, mu_s=stats.mu_s, sigma_s=stats.sigma_s,
                      mu_dinov2=np.zeros(1024), sigma_dinov2=np.eye(1024)).save(wide)
    monkeypatch.setattr(fid, "_forward", lambda *a, **k: pytest.fail("features computed first"))
    for ref, match in [(nodino, r"nodino.npz has no DINOv2 statistics .*--save_stats --fd_dinov2"),
                       (wide, "its mu_dinov2 has 1024 dimensions but this run's DINOv2 features")]:
        with pytest.raises(UserError, match=match):
            fid.main([a, ref, *flags])


def test_a_dinov2_file_that_does_not_load_strictly_is_one_line(tmp_path):
    torch.save({"blocks.0.norm1.weight": torch.ones(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth does not hold dinov2_vitl14 weights") as e:
        fid.load_dinov2(str(tmp_path / "other.pth"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--dinov2_ckpt .*missing.pth does not exist"):
        fid.load_dinov2(str(tmp_path / "missing.pth"))


def test_save_stats_of_a_statistics_reference_is_refused(tmp_path, monkeypatch):
    """It was ignored with exit 0: nothing to compute, so no file was written."""
    monkeypatch.setattr(fid, "load_inception", stub_loader)
    np.savez(tmp_path / "s.npz", arr_0=random_uint8_images(20, 16, 16, seed=1))
    s, r, cpu = str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), ["--device", "cpu"]
    fid.main([s, "--save_stats", r, *cpu])
    with pytest.raises(UserError, match="r.npz is already a statistics file: drop --save_stats"):
        fid.main([s, r, "--save_stats", str(tmp_path / "again.npz"), *cpu])
