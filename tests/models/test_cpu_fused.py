"""lmwright's fused RMSNorm and SwiGLU kernels for training on a CPU (lmwright.models.cpu_fused) against
transformers' own modules, and the switch of a model's modules (training mode only)."""

from __future__ import annotations

import pytest
import torch

from lmwright.models import cpu_fused as cf
from tests.models.conftest import rel_error

needs_kernel = pytest.mark.skipif(cf.kernel() is None, reason=f"lmwright's fused kernels: {cf.unavailable_reason()}")


def _llama(layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "variance_epsilon"):
                m.weight.uniform_(0.5, 1.5)
    return model


@needs_kernel
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_transformers(w_dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(192, eps=1e-5).to(w_dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(192, generator=g) + 0.5)
    x = (torch.randn(3, 37, 192, generator=g) * 3).bfloat16().requires_grad_()
    y = cf.rms_norm(x, norm.weight, 1e-5)
    want = norm(x)
    assert y.dtype == want.dtype == torch.promote_types(w_dtype, torch.bfloat16) and y.shape == want.shape
    # the same roundings as transformers' (x * rstd to bf16, then times the weight); rstd's sum order may differ
    assert float((y.float() - want.float()).abs().max()) <= 2**-7 * float(want.abs().max())
    dy = torch.randn(want.shape, generator=g).to(want.dtype)
    y.backward(dy)
    got = x.grad.clone()
    x.grad = None
    want.backward(dy)
    assert got.dtype == torch.bfloat16 and rel_error(got, x.grad) < 1e-2


@needs_kernel
def test_swiglu_matches_silu_times_up():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(2, 33, 256, generator=g) * 4).bfloat16().requires_grad_()
    b = torch.randn(2, 33, 256, generator=g).bfloat16().requires_grad_()
    dh = torch.randn(2, 33, 256, generator=g).bfloat16()
    h = cf.swiglu(a, b)
    want = torch.nn.functional.silu(a.float()) * b.float()  # fp32: ours rounds once, torch's bf16 path twice
    torch.testing.assert_close(h.float(), want.detach(), atol=2e-2, rtol=2**-7)
    h.backward(dh)
    got = [a.grad.clone(), b.grad.clone()]
    a.grad = b.grad = None
    want.backward(dh.float())
    for x, ref in zip(got, (a.grad, b.grad)):
        assert x.dtype == torch.bfloat16 and rel_error(x, ref) < 1e-2
    big = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0] + [0.0] * 11).bfloat16()  # sigmoid's tails stay finite
    out = cf.swiglu(big, torch.ones_like(big))
    assert torch.isfinite(out).all() and out[0] == 0 and out[4] == 200


@needs_kernel
def test_fused_model_trains_like_transformers_and_evaluates_exactly_as_it():
    """A bf16 LoRA-style step (frozen norms) through the switched modules: loss and gradients within bf16
    rounding of transformers' own; in eval mode the switched model is transformers' code, bit for bit."""
    model = _llama().bfloat16()
    for n, p in model.named_parameters():
        p.requires_grad_("norm" not in n)  # the norms frozen, as an adapter's base is
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 96), ids[:, 1:].reshape(-1))
        loss.backward()
        return float(loss), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    model.eval()
    with torch.no_grad():
        plain_eval = model(input_ids=ids).logits
    model.train()
    ref_loss, ref_grads = step()
    assert cf.fuse_for_training(model) == 2 * 2 + 1 + 2  # two norms per layer, the final norm, one MLP per layer
    assert cf.fuse_for_training(model) == 0  # switched once
    with torch.profiler.profile() as prof:
        loss, grads = step()
    names = {e.key for e in prof.key_averages()}
    assert {cf.PROFILE_NAME + ".rms_norm", cf.PROFILE_NAME + ".swiglu_backward"} <= names
    assert abs(loss - ref_loss) < 1e-2
    assert grads.keys() == ref_grads.keys()
    for n, gr in ref_grads.items():
        assert rel_error(grads[n], gr) < 3e-2, f"{n}: relative error {rel_error(grads[n], gr):.3g}"
    model.eval()
    with torch.no_grad(), torch.profiler.profile() as prof:
        assert torch.equal(model(input_ids=ids).logits, plain_eval)
    assert not any(e.key.startswith(cf.PROFILE_NAME) for e in prof.key_averages())


@needs_kernel
def test_trained_norms_and_fp32_activations_keep_transformers_path():
    """Full fine-tuning trains the norm weights (no gradient for them here: transformers' path), and fp32
    activations (no autocast) have nothing to fuse."""
    model = _llama(layers=1)
    cf.fuse_for_training(model)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile() as prof:
        model(input_ids=ids).logits.sum().backward()  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids).logits.float().sum().backward()  # bf16, norms trained
    names = {e.key for e in prof.key_averages()}
    assert cf.PROFILE_NAME + ".rms_norm" not in names  # the trained norms: transformers' own
    assert cf.PROFILE_NAME + ".swiglu" in names  # the MLP product has no weights of its own: fused under bf16
    assert all(p.grad is not None for n, p in model.named_parameters() if "norm" in n)


@needs_kernel
def test_gradient_checkpointing_with_fused_modules():
    model = _llama().bfloat16()
    for n, p in model.named_parameters():
        p.requires_grad_("norm" not in n)
    cf.fuse_for_training(model)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
