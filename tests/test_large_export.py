"""A decoder whose fp32 export passes the 2 GB protobuf limit: it is written with external
data, loads in ORT and generates what ``transformers`` generates.

About 2.2 GB of weights (an untied 262,144 x 1,024 embedding and LM head, one layer): several
GB of memory and a minute or two, so it is left out of the default run (``-m 'not large'``);
run it with ``bash scripts/test.sh -m large``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt.decoder import capture_decoder
from graphopt.export import make_session, to_onnx
from graphopt.export.generation import Generator

pytestmark = pytest.mark.large


def test_a_decoder_over_2gb_exports_loads_and_generates(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=262144, hidden_size=1024, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                                      intermediate_size=256, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert sum(p.numel() for p in model.parameters()) * 4 > 2**31
    exported = to_onnx(capture_decoder(model), tmp_path / "model.onnx", strip_metadata=True)
    assert exported.external_data_path is not None and exported.external_data_path.parent == tmp_path
    assert exported.bytes > 2**31 and (tmp_path / "model.onnx").stat().st_size < 2**24  # the weights are outside the protobuf
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    ours = Generator(make_session(tmp_path / "model.onnx", threads=2)).generate(prompts, max_new_tokens=8, eos_token_id=[])
    ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
    mask = (torch.arange(7)[None] >= torch.tensor([[0], [4]])).long()
    with torch.inference_mode():
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(ours.new_tokens, theirs[:, 7:].numpy())
