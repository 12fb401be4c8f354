import torch

from pruning.pruners import Hessian, InputNorms, magnitude_mask, sparsegpt_prune, wanda_mask


def _layer_problem(seed: int = 0):
    """A linear layer and correlated calibration inputs with a few outlier features."""
    generator = torch.Generator().manual_seed(seed)
    cols, rows, tokens = 128, 64, 2048
    basis = torch.randn(16, cols, generator=generator)
    inputs = torch.randn(tokens, 16, generator=generator) @ basis + 0.3 * torch.randn(tokens, cols, generator=generator)
    inputs[:, :3] *= 8.0
    weight = torch.randn(rows, cols, generator=generator)
    return weight, inputs


def _error(weight, pruned, inputs) -> float:
    return float(((inputs @ weight.t() - inputs @ pruned.t()) ** 2).mean())


def _all_errors(nm=None, sparsity=0.5):
    weight, inputs = _layer_problem()
    hessian, norms = Hessian(128, torch.device("cpu")), InputNorms(128, torch.device("cpu"))
    for chunk in inputs.split(512):
        hessian.add(chunk)
        norms.add(chunk)
    pruned = {
        "magnitude": weight.masked_fill(magnitude_mask(weight, sparsity, nm), 0),
        "wanda": weight.masked_fill(wanda_mask(weight, norms, sparsity, nm), 0),
        "sparsegpt": sparsegpt_prune(weight, hessian.matrix, sparsity, nm, blocksize=32),
    }
    return {name: _error(weight, w, inputs) for name, w in pruned.items()}, pruned


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude_unstructured():
    errors, pruned = _all_errors()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert float((pruned["sparsegpt"] == 0).float().mean()) == 0.5


def test_sparsegpt_reconstructs_better_with_2_4():
    errors, pruned = _all_errors(nm=(2, 4))
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    zeros = (pruned["sparsegpt"] == 0).reshape(64, 32, 4).sum(-1)
    assert (zeros >= 2).all()


def test_hessian_is_twice_mean_outer_product():
    x = torch.randn(300, 8)
    hessian = Hessian(8, torch.device("cpu"))
    for chunk in x.split(70):
        hessian.add(chunk)
    assert torch.allclose(hessian.matrix, 2 * x.t() @ x / 300, atol=1e-5)
