"""Run by test_build.py in a copy of the package whose C++ extension failed to build.

The op schemas come from Python, so every op still runs with impl="triton" (under
TRITON_INTERPRET=1 on a machine without a GPU), forward and backward, with the
Python autograd: each is compared with impl="torch" here. Exits non-zero on failure.
"""

import sys

# An editable install of the main checkout must not supply genkern._C to the copy.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]

import torch  # noqa: E402

import genkern  # noqa: E402


def grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(o.float().square().sum() for o in outs).backward()
    return [o.detach() for o in outs], [x.grad for x in leaves]


def same(name, fn, *inputs, atol=1e-5):
    got = grads(lambda *a: fn(*a, impl="triton"), *inputs)
    want = grads(lambda *a: fn(*a, impl="torch"), *inputs)
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
    print("ok", name)


def main(root: str) -> None:
    assert genkern.__file__.startswith(root), genkern.__file__
    impls = genkern.info()["impls"]
    assert not impls["cpp"]["available"], impls
    assert impls["triton"]["available"], impls
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731

    mu, logvar, eps = rand(3, 5), rand(3, 5) * 0.3, rand(3, 5)
    same("reparameterize_kl", lambda m, lv, e, impl: genkern.reparameterize_kl(m, lv, e, impl=impl), mu, logvar, eps)
    same(
        "reparameterize_kl prior",
        lambda m, lv, e, p, impl: genkern.reparameterize_kl(m, lv, e, prior_mu=p, prior_logvar=p * 0.5, impl=impl),
        mu,
        logvar,
        eps,
        rand(5),
    )
    real, fake = rand(6, 1), rand(6, 1)
    for kind in ("nonsaturating", "hinge", "wasserstein", "relativistic"):
        for reduction in ("mean", "none"):
            same(
                f"discriminator_loss {kind} {reduction}",
                lambda r, f, impl: genkern.discriminator_loss(r, f, kind, reduction=reduction, impl=impl),
                real,
                fake,
            )
            same(
                f"generator_loss {kind} {reduction}",
                lambda r, f, impl: genkern.generator_loss(f, kind, real_logits=r, reduction=reduction, impl=impl),
                real,
                fake,
            )
    q, k, v = rand(1, 2, 5, 16), rand(1, 1, 7, 16), rand(1, 1, 7, 16)
    for causal in (True, False):
        same(
            f"flash_attention causal={causal}",
            lambda q_, k_, v_, impl: genkern.flash_attention(q_, k_, v_, causal=causal, impl=impl),
            q,
            k,
            v,
            atol=1e-4,
        )
    q1, k_cache, v_cache, k_new, v_new = (
        rand(2, 4, 1, 16),
        rand(2, 2, 9, 16),
        rand(2, 2, 9, 16),
        rand(2, 2, 1, 16),
        rand(2, 2, 1, 16),
    )
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    with torch.no_grad():
        outs = [
            (genkern.attention_with_kvcache(q1, kc, vc, seqlens, k_new, v_new, impl=impl), kc, vc)
            for impl in ("triton", "torch")
            for kc, vc in [(k_cache.clone(), v_cache.clone())]
        ]
    for g, w in zip(*outs):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    print("ok attention_with_kvcache")


if __name__ == "__main__":
    main(sys.argv[1])
