"""The torch twins themselves against a naive per-sequence computation (they are what CPU runs)."""
import torch

from strata.ops import ref


def naive_decode(q, kc, vc, bt, sl, scale):
    B, H, d = q.shape
    kvh = kc.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        L = int(sl[b])
        k = ref.gather_kv(kc, bt[b], L).repeat_interleave(H // kvh, dim=1)  # [L, H, d]
        v = ref.gather_kv(vc, bt[b], L).repeat_interleave(H // kvh, dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[b], k) * scale, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", p, v)
    return out


def test_decode_attention_grouped_by_length_equals_naive():
    g = torch.Generator().manual_seed(0)
    B, H, kvh, d, bs, width = 37, 8, 2, 16, 16, 12  # > DECODE_GROUP: the length-grouped path
    nb = B * width + 1
    kc, vc = torch.randn(nb, bs, kvh, d, generator=g), torch.randn(nb, bs, kvh, d, generator=g)
    bt = (torch.randperm(nb - 1, generator=g)[: B * width] + 1).view(B, width).int()
    sl = torch.randint(1, width * bs + 1, (B,), generator=g).int()
    q = torch.randn(B, H, d, generator=g)
    assert B > ref.DECODE_GROUP
    torch.testing.assert_close(ref.paged_decode_attention(q, kc, vc, bt, sl, 0.25),
                               naive_decode(q, kc, vc, bt, sl, 0.25), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.paged_decode_attention(q[:5], kc, vc, bt[:5], sl[:5], 0.25),
                               naive_decode(q[:5], kc, vc, bt[:5], sl[:5], 0.25), atol=1e-5, rtol=1e-5)
