import pytest
import torch

from conftest import build_model, tiny_llama_config, tiny_opt_config
from pruning.capture import capture_block_inputs, run_block
from pruning.load import find_blocks, find_linears


def _gemma3_config():
    from transformers import Gemma3TextConfig

    # Alternating sliding-window / global layers with different rotary bases: each block gets its own kwargs.
    return Gemma3TextConfig(vocab_size=123, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256)


@pytest.mark.parametrize("config_fn", [tiny_llama_config, tiny_opt_config, _gemma3_config],
                         ids=["llama", "opt", "gemma3"])
def test_blocks_replayed_from_captured_inputs_match_the_model(config_fn):
    config = config_fn()
    model = build_model(config)
    windows = torch.randint(3, config.vocab_size, (5, 24))
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    blocks = find_blocks(model)
    captured = capture_block_inputs(model, blocks, windows, batch_size=2, device=torch.device("cpu"))
    assert [h.shape[0] for h in captured.hidden] == [2, 2, 1]
    assert all(isinstance(b, type(blocks[0])) for b in blocks), "blocks restored after capture"
    hidden = captured.hidden
    for index in range(len(blocks) - 1):
        # hidden_states[l] is the input of block l (the last entry has the final norm applied)
        assert torch.allclose(torch.cat(hidden), reference[index], atol=1e-5), f"block {index} input differs"
        hidden = run_block(blocks[index], hidden, captured.calls[index])


def test_finds_every_linear_of_a_llama_block():
    model = build_model(tiny_llama_config())
    names = set(find_linears(find_blocks(model)[0]))
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
