"""Our Orbax model checkpoint: a config that does not describe the saved parameters is refused."""

import json

import pytest

from lvlm_jax.errors import UserError
from lvlm_jax.models import hf, params_io

TINY = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)


@pytest.mark.parametrize("layers,differing", [(2, "layers.2"), (4, "layers.3")])
def test_config_with_other_layer_count_is_one_line_user_error(tmp_path, layers, differing):
  """A saved 3-layer model under a config of 2 (a layer unread) or 4 (a layer missing)."""
  params_io.save_model(hf.build_model(TINY), str(tmp_path))
  path = tmp_path / "config.json"
  config = json.load(open(path))
  config["num_hidden_layers"] = layers
  json.dump(config, open(path, "w"))
  with pytest.raises(UserError) as error:
    params_io.load_model(str(tmp_path))
  assert str(error.value) == (f"{tmp_path}: params/ does not hold the parameters config.json "
                              f"describes (they differ at {differing}); restore the config that "
                              "was saved with them")
