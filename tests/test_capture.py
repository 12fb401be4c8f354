import pytest
import torch

from conftest import build_model, tiny_llama_config, tiny_opt_config
from pruning.capture import capture_block_inputs, run_block
from pruning.load import find_blocks, find_linears


@pytest.mark.parametrize("config", [tiny_llama_config(), tiny_opt_config()], ids=["llama", "opt"])
def test_blocks_replayed_from_captured_inputs_match_the_model(config):
    model = build_model(config)
    windows = torch.randint(3, config.vocab_size, (5, 24))
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, batch_size=2, device=torch.device("cpu"))
    assert [item.hidden.shape[0] for item in inputs] == [2, 2, 1]
    for index in range(len(blocks) - 1):
        # hidden_states[l] is the input of block l (the last entry has the final norm applied)
        replayed = torch.cat([item.hidden for item in inputs])
        assert torch.allclose(replayed, reference[index], atol=1e-5), f"block {index} input differs"
        inputs = run_block(blocks[index], inputs)


def test_finds_every_linear_of_a_llama_block():
    model = build_model(tiny_llama_config())
    names = set(find_linears(find_blocks(model)[0]))
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
