"""LightningDiT and flow matching: reference key lists, init, position tables, a block against a
from-scratch computation, label dropout, FLOPs, bf16 autocast, grad checkpointing, and training."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import train_dit
from common import forward_flops
from conftest import randomize_
from dit import (DiT_models, LightningDiT, LabelEmbedder, TimestepEmbedder, apply_rope, build_dit,
                 flow_matching_loss, get_2d_sincos_pos_embed, rope_tables)

# Key lists dumped from the reference implementation's state dicts.
REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            num_classes=10)


def tiny(**kw):
    return LightningDiT(**{**TINY, **kw})


# --------------------------------------------------------------------------------------------------
# State dict = the reference LightningDiT's


def read_reference(name):
    path = os.path.join(REF, f"lightningdit_keys_{name}.txt")
    rows, header = [], {}
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("# entries:"):
            parts = line[1:].replace(":", "").split()  # entries N floating-point elements M
            header["entries"], header["floats"] = int(parts[1]), int(parts[-1])
        elif line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
            rows.append((key, dims, dtype))
    return rows, header


@pytest.mark.parametrize("name,config,qknorm",
                         [("B1", "B/1", False), ("B1_qknorm", "B/1", True), ("XL1", "XL/1", False),
                          ("XL1_qknorm", "XL/1", True)])
def test_state_dict_matches_reference(name, config, qknorm):
    rows, header = read_reference(name)
    with torch.device("meta"):
        model = build_dit(config, input_size=16, in_channels=32, num_classes=1000,
                          use_qknorm=qknorm)
    sd = model.state_dict()
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]
    assert ours == rows  # same keys, same order, same shapes and dtypes
    assert len(sd) == header["entries"]
    assert sum(v.numel() for v in sd.values() if v.is_floating_point()) == header["floats"]
    assert not model.pos_embed.requires_grad


def test_xl1_parameter_count():
    with torch.device("meta"):
        model = build_dit("XL/1", input_size=16, in_channels=32)
    # 675,256,736 parameters including the fixed pos_embed; + 2 x 256 x 72 RoPE buffer elements.
    assert sum(p.numel() for p in model.parameters()) == 675_256_736
    # The reference file's header.
    assert sum(v.numel() for v in model.state_dict().values()) == 675_293_600
    assert model.blocks[0].mlp.w3.in_features == 3072


def test_registry(capsys):
    expected = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    class_conditional = [name for name in DiT_models if not name.startswith("T2I-")]
    assert sorted(class_conditional) == sorted(f"{s}/{p}" for s in expected for p in (1, 2))
    for name in class_conditional:
        size, p = name.split("/")
        with torch.device("meta"):
            m = build_dit(name, input_size=16, in_channels=32)
        assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (*expected[size], int(p))
        assert m.num_patches == (16 // int(p)) ** 2
    with pytest.raises(SystemExit):  # argparse's choices refuse an unknown name
        train_dit.parse_args(["--model", "XXL/1"])
    assert "'XL/1'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Init and fixed tables


def test_output_exactly_zero_at_init():
    model = tiny()
    x = torch.randn(5, 4, 8, 8)
    for training in (True, False):
        out = model.train(training)(x, torch.rand(5), torch.tensor([0, 3, 9, 10, 1]))
        assert out.shape == x.shape
        assert torch.count_nonzero(out) == 0
    # ... while the trunk is not trivial: the final layer is what zeroes it (AdaLN-Zero).
    assert model.y_embedder.embedding_table.weight.std() > 0.01
    assert model.y_embedder.embedding_table.weight.shape[0] == 11  # + null class


def test_sincos_pos_embed_matches_formula():
    D, G = 16, 5
    table = get_2d_sincos_pos_embed(D, G)
    assert table.dtype == torch.float32 and table.shape == (G * G, D)
    for token in range(G * G):
        row, col = token // G, token % G
        for half, p in ((0, col), (1, row)):  # first half: column index; second half: row index
            for k in range(D // 4):
                w = 10000.0 ** (-k / (D / 4))
                sin_ch, cos_ch = half * D // 2 + k, half * D // 2 + D // 4 + k
                assert table[token, sin_ch].item() == pytest.approx(math.sin(p * w), abs=1e-6)
                assert table[token, cos_ch].item() == pytest.approx(math.cos(p * w), abs=1e-6)
    model = tiny()
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(64, 4))


def rope_angle(token, channel, head_dim, grid):
    """Angle of channel `channel` of token `token`, from rope_tables' definition."""
    half = head_dim // 2
    pos = token // grid if channel < half else token % grid  # first half: row; second half: column
    j = (channel % half) // 2  # frequencies repeated twice: f0, f0, f1, f1, ...
    return pos * 10000.0 ** (-2 * j / half)


def test_rope_tables_match_formula():
    head_dim, grid = 16, 4
    rope = tiny().feat_rope  # 64 wide, 4 heads, a 4x4 grid of patches
    assert rope.freqs_cos.shape == (grid * grid, head_dim)
    assert "freqs_cos" in rope.state_dict() and "freqs_sin" in rope.state_dict()
    for token in range(grid * grid):
        for ch in range(head_dim):
            a = rope_angle(token, ch, head_dim, grid)
            assert rope.freqs_cos[token, ch].item() == pytest.approx(math.cos(a), abs=1e-6)
            assert rope.freqs_sin[token, ch].item() == pytest.approx(math.sin(a), abs=1e-6)


def test_rope_is_a_rotation_of_adjacent_pairs():
    head_dim, grid = 8, 3
    cos, sin = rope_tables(head_dim, grid, grid)

    def rope(x):
        return apply_rope(x, cos, sin)

    x = torch.randn(2, grid * grid, 3, head_dim, dtype=torch.float64)  # (B, N, heads, head_dim)
    out = rope(x.float()).double()
    for token in range(grid * grid):
        for i in range(head_dim // 2):
            a = rope_angle(token, 2 * i, head_dim, grid)
            R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                             dtype=torch.float64)
            expected = x[:, token, :, 2 * i:2 * i + 2] @ R.T
            torch.testing.assert_close(out[:, token, :, 2 * i:2 * i + 2], expected, atol=1e-5,
                                       rtol=1e-5)
    # q and k stacked (B, N, 2, heads, head_dim): each rotated by its token's angles
    torch.testing.assert_close(rope(torch.stack([x, 2 * x], dim=2).float()).double(),
                               torch.stack([out, 2 * out], dim=2), atol=1e-5, rtol=1e-5)


def test_timestep_embedding_uses_raw_t():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    i = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(1e4) * i / 128)
    args = t.double()[:, None] * f
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    torch.testing.assert_close(emb.double(), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# The model against a from-scratch computation


def manual_rmsnorm(x, w):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def manual_rope(x, grid):
    """RoPE as a complex multiplication: pair (x[2i], x[2i+1]) is a complex number times
    e^{i angle}."""
    B, H, N, Dh = x.shape
    angles = torch.tensor([[rope_angle(n, 2 * i, Dh, grid) for i in range(Dh // 2)]
                           for n in range(N)], dtype=torch.float64)
    z = torch.view_as_complex(x.reshape(B, H, N, Dh // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).reshape(B, H, N, Dh)


def manual_block(blk, x, c, grid, qknorm):
    P = {k: v.double() for k, v in blk.state_dict().items()}
    B, N, D = x.shape
    H = blk.num_heads
    Dh = D // H
    mods = F.silu(c) @ P["adaLN_modulation.1.weight"].T + P["adaLN_modulation.1.bias"]
    sh1, sc1, g1, sh2, sc2, g2 = [mods[:, k * D:(k + 1) * D, None].transpose(1, 2)
                                  for k in range(6)]
    h = manual_rmsnorm(x, P["norm1.weight"]) * (1 + sc1) + sh1
    qkv = h @ P["attn.qkv.weight"].T + P["attn.qkv.bias"]
    q, k, v = [qkv[..., s * D:(s + 1) * D].reshape(B, N, H, Dh).transpose(1, 2) for s in range(3)]
    if qknorm:
        q = manual_rmsnorm(q, P["attn.q_norm.weight"])
        k = manual_rmsnorm(k, P["attn.k_norm.weight"])
    q, k = manual_rope(q, grid), manual_rope(k, grid)
    s = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    p = torch.exp(s - s.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    a = (p @ v).transpose(1, 2).reshape(B, N, D) @ P["attn.proj.weight"].T + P["attn.proj.bias"]
    x = x + g1 * a
    h = manual_rmsnorm(x, P["norm2.weight"]) * (1 + sc2) + sh2
    ab = h @ P["mlp.w12.weight"].T + P["mlp.w12.bias"]
    hid = ab.shape[-1] // 2
    swiglu = ab[..., :hid] * torch.sigmoid(ab[..., :hid]) * ab[..., hid:]
    m = swiglu @ P["mlp.w3.weight"].T + P["mlp.w3.bias"]
    return x + g2 * m


@pytest.mark.parametrize("qknorm", [False, True])
def test_block_matches_manual_computation(qknorm):
    torch.manual_seed(0)
    model = randomize_(tiny(use_qknorm=qknorm)).eval()
    blk = model.blocks[0]
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    out = blk(x, c, (model.feat_rope.freqs_cos, model.feat_rope.freqs_sin))
    ref = manual_block(blk, x.double(), c.double(), grid=4, qknorm=qknorm)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


def test_model_matches_manual_computation():
    """Patchify, embeddings, blocks, final layer and the (p, q, c) unpatchify layout, end to end."""
    torch.manual_seed(1)
    model = randomize_(tiny(use_qknorm=True)).eval()
    P = {k: v.double() for k, v in model.state_dict().items()}
    B, C, p, g, D = 2, 4, 2, 4, 64
    x, t, y = torch.randn(B, C, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([3, 10])
    out = model(x, t, y)

    xd = x.double()
    tokens = torch.stack([xd[:, :, r * p:(r + 1) * p, q * p:(q + 1) * p].reshape(B, -1)
                          for r in range(g) for q in range(g)], dim=1)  # (c, p, q) order
    w_patch = P["x_embedder.proj.weight"].reshape(D, -1)
    h = tokens @ w_patch.T + P["x_embedder.proj.bias"] + P["pos_embed"]
    tf = TimestepEmbedder.timestep_embedding(t).double()
    te = F.silu(tf @ P["t_embedder.mlp.0.weight"].T + P["t_embedder.mlp.0.bias"])
    te = te @ P["t_embedder.mlp.2.weight"].T + P["t_embedder.mlp.2.bias"]
    c = te + P["y_embedder.embedding_table.weight"][y]
    for blk in model.blocks:
        h = manual_block(blk, h, c, grid=g, qknorm=True)
    w, b = P["final_layer.adaLN_modulation.1.weight"], P["final_layer.adaLN_modulation.1.bias"]
    mods = F.silu(c) @ w.T + b
    shift, scale = mods[:, None, :D], mods[:, None, D:]
    h = manual_rmsnorm(h, P["final_layer.norm_final.weight"]) * (1 + scale) + shift
    h = h @ P["final_layer.linear.weight"].T + P["final_layer.linear.bias"]  # (B, N, p*p*C)
    ref = torch.zeros(B, C, 8, 8, dtype=torch.float64)
    for n in range(g * g):
        r, q = divmod(n, g)
        for i in range(p):
            for j in range(p):
                for ch in range(C):
                    ref[:, ch, r * p + i, q * p + j] = h[:, n, (i * p + j) * C + ch]
    torch.testing.assert_close(out.double(), ref, atol=5e-4, rtol=5e-4)
    # A scalar t means the same t for the whole batch.
    torch.testing.assert_close(model(x, torch.tensor(0.2), y)[0], model(x, t, y)[0])


# --------------------------------------------------------------------------------------------------
# Label dropout, FLOPs


def test_label_dropout_rate():
    emb = LabelEmbedder(num_classes=10, hidden_size=1, dropout_prob=0.1)
    with torch.no_grad():
        emb.embedding_table.weight.copy_(torch.arange(11.0)[:, None])  # output = the label used
    labels = torch.randint(0, 10, (100_000,))
    torch.manual_seed(0)
    used = emb.train()(labels)[:, 0].long()
    dropped = used == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert torch.equal(used[~dropped], labels[~dropped])
    assert torch.equal(emb.eval()(labels)[:, 0].long(), labels)  # no dropout at eval
    force = torch.zeros_like(labels)
    force[:7] = 1
    used = emb.train()(labels, force_drop_ids=force)[:, 0].long()
    assert (used[:7] == 10).all() and torch.equal(used[7:], labels[7:])


def test_flops_per_image():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny()
    B = 3
    # Math SDPA = counted bmm.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(B, 4, 8, 8), torch.rand(B), torch.tensor([0, 1, 2]))
    assert counter.get_total_flops() == B * forward_flops(model, model.num_patches)
    with torch.device("meta"):
        xl = build_dit("XL/1", input_size=16, in_channels=32)
    N, D, L = 256, 1152, 28
    per_token = 3 * D * D + D * D + D * 2 * 3072 + 3072 * D  # qkv, proj, w12, w3
    per_layer = 2 * N * per_token + 2 * D * 6 * D + 4 * N * N * D
    expected = L * per_layer + 2 * N * (32 * D + D * 32) + 2 * (256 * D + D * D + D * 2 * D)
    assert forward_flops(xl, N) == expected


# --------------------------------------------------------------------------------------------------
# Numerics: bf16 autocast, grad checkpointing


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = randomize_(tiny(use_qknorm=True), scale=0.1).eval()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
        loss, parts = flow_matching_loss(model, x, y, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.03
    assert loss.dtype == torch.float32 and parts["mse"].dtype == torch.float32
    assert torch.isfinite(loss)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = randomize_(tiny(), scale=0.1).eval()  # eval: no random label dropout between runs
    x1, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        loss, _ = flow_matching_loss(model, x1, y, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Flow matching


def test_flow_matching_conventions():
    """A model that knows x1 and returns the exact velocity x1 - eps gets zero loss: this pins
    x_t = t x1 + (1 - t) eps and v = x1 - eps. It also records t: logit(t) ~ N(0, 1)."""
    x1 = torch.randn(4096, 3, 2, 2)
    seen = {}

    def oracle(x_t, t, y):
        tt = t.view(-1, 1, 1, 1)
        eps = (x_t - tt * x1) / (1 - tt)
        seen["t"] = t
        return x1 - eps

    loss, parts = flow_matching_loss(oracle, x1, None, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-4 and parts["mse"].item() < 1e-4 and parts["cos"].item() < 1e-4
    logit = torch.logit(seen["t"].double())
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05
    # A zero prediction: MSE = E|x1 - eps|^2 = 2, cosine part = 1.
    loss, parts = flow_matching_loss(lambda x_t, t, y: torch.zeros_like(x_t), x1, None)
    assert abs(parts["mse"].item() - 2) < 0.05 and parts["cos"].item() == pytest.approx(1.0)
    torch.testing.assert_close(loss, parts["mse"] + parts["cos"])


def test_loss_decreases_on_tiny_latent_set():
    """16 latents, one class each (no label dropout): given y the data point is known, so the exact
    velocity is predictable and the loss can fall far below its initial value of ~3
    (MSE 2 + cos 1)."""
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2,
                         num_heads=4, num_classes=16, class_dropout_prob=0.0)
    x1 = torch.randn(16, 4, 4, 4)
    y = torch.arange(16)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            losses = [flow_matching_loss(model, x1, y, generator=g)[0].item() for _ in range(16)]
            return sum(losses) / 16

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss, _ = flow_matching_loss(model, x1, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before > 2.5 and after < before / 4, (before, after)
