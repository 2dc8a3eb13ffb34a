"""fid.py's ADM evaluation protocol: sFID's features (which Inception tensor, which channels, in
what order), the statistics over chunks and ranks, a reference batch's stored statistics, the
resumable whole-set statistics, ADM's folder crop, and bad input (random Inception weights)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from common import DistEnv, UserError
from conftest import StubInception, run_script
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
    """The stub network's (pool, logits, spatial) of uint8 NHWC images, computed directly."""
    with torch.no_grad():
        return [
            t.numpy()
            for t in StubInception()(
                torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, spatial=True
            )
        ]


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
            "wide.npz: its mu has 2048 dimensions but this Inception's pool features have 64",
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
        ([s, str(tmp_path / "nope")], "nope does not exist"),
        (
            [s, r, "--clip_model", "m", "--prompts", str(tmp_path / "none.txt")],
            "cannot read the prompt file",
        ),
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
            set(z.files) == {"mu", "sigma", "mu_s", "sigma_s", "num_images"}
            and int(z["num_images"]) == 22
        )
        for key, want in (
            ("mu", pool.mean(0)),
            ("sigma", np.cov(pool, rowvar=False)),
            ("mu_s", spatial.mean(0)),
            ("sigma_s", np.cov(spatial, rowvar=False)),
        ):
            np.testing.assert_allclose(
                z[key], want, rtol=1e-4, atol=1e-7
            )  # float32 features, batched
    # Two ranks (rank 1 first, as if it finished first): the merged statistics are the same.
    source = fid.load_source(str(tmp_path / "set.npz"))
    out2 = str(tmp_path / "stats2.npz")
    for rank in (1, 0):
        fid.dataset_statistics(
            source, StubInception(), DistEnv(rank, rank, 2, torch.device("cpu")), out2, 4
        )
    with np.load(out) as one, np.load(out2) as two:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-7)


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
