"""`layers.matmul`: jnp.dot's values and gradients, with the CPU weight gradient in the form
XLA:CPU runs on YNNPACK (no product contracting the leading dimension of its left operand)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvlm_jax.models.layers import matmul


def _loss(product, x, w):
  y = product(x, w)
  return jnp.sum(jax.nn.silu(y) * jnp.cos(y))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("x_shape", [(24, 16), (2, 12, 16)])
def test_values_and_gradients_match_jnp_dot(dtype, tol, x_shape):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape, dtype)
  w = (jax.random.normal(kw, (16, 40)) * 0.3).astype(dtype)
  np.testing.assert_allclose(np.asarray(jax.jit(matmul)(x, w), np.float32),
                             np.asarray(jnp.dot(x, w), np.float32), rtol=tol, atol=tol)
  got = jax.jit(jax.grad(lambda x, w: _loss(matmul, x, w), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(lambda x, w: _loss(jnp.dot, x, w), argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=tol, atol=tol * scale)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU layout workaround")
def test_cpu_weight_gradient_contracts_the_minor_dimension():
  x = jnp.ones((256, 64)); w = jnp.ones((64, 96))

  def compiled(product):
    grad = jax.jit(jax.grad(lambda x, w: _loss(product, x, w), argnums=(0, 1)))
    return grad.lower(x, w).compile().as_text()
  # jnp.dot's weight gradient contracts x's leading dimension (the form Eigen runs) ...
  assert "lhs_contracting_dims={0}" in compiled(jnp.dot)
  # ... matmul's does not.
  assert "lhs_contracting_dims={0}" not in compiled(matmul)
